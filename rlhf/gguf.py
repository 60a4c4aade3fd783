"""A GGUF file (llama.cpp's format) -> a plain transformers model folder, once (`rlhf convert`).

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)`` with the ``gguf`` package) and dequantizes
every tensor to float; the tokenizer and its chat template come from the file's metadata. We do that once and save
the result as an ordinary folder (config.json, safetensors, tokenizer, chat template, generation config) rather
than reading the GGUF at every stage:
- the stage contract names the base by folder and fingerprints its config and weights' index (rlhf/manifest.py),
  and each stage folder must load with plain peft/transformers: an adapter whose base is a GGUF file would need the
  ``gguf`` package and the file's own folder layout to load anywhere;
- the dequantized model carries a ``quantization_config`` of kind "gguf", which transformers will not save and
  which clashes with our bitsandbytes 4/8-bit (quantization: 4bit re-quantizes the float weights on load, as for any
  base, docs/quantization.md);
- dequantizing costs ~25 s of CPU for a 135M model, at every load; the folder loads in a second.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rlhf.errors import RlhfError

log = logging.getLogger("rlhf")

MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
DTYPES = ("float32", "bfloat16", "float16")


class GGUFError(RlhfError, ValueError):
    """A GGUF file that cannot be converted, or a target folder that cannot be written."""


def check_gguf(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a readable GGUF file; else one line saying what is wrong."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "a folder" if p.is_dir() else "missing"
        raise GGUFError(f"GGUF file {path} is {what}; give the path of a .gguf file (e.g. scripts/fetch_smollm2.py "
                        "prints where it put SmolLM2's)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); give a llama.cpp .gguf "
                        "file, or use a transformers model folder as model_name_or_path directly")
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError as e:
        raise GGUFError("reading GGUF needs the `gguf` package: pip install 'rlhf[gguf]' (or pip install gguf)") from e
    return p


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Write the model of GGUF file ``path`` to folder ``out`` as a transformers model; returns ``out``.

    Atomic: the folder is written under a temporary name beside ``out`` and renamed when complete, so a killed
    conversion leaves no folder that looks finished. ``dtype``: float32 keeps the dequantized values exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = check_gguf(path)
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype} is not known; use one of {', '.join(DTYPES)}")
    dst = Path(out).expanduser()
    if dst.exists() and not overwrite:
        raise GGUFError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                     dtype=getattr(torch, dtype))
    except (ValueError, KeyError, NotImplementedError) as e:  # transformers: an architecture it cannot read
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise GGUFError(f"transformers cannot load {path} ({why}); see its list of supported GGUF architectures "
                        "and quantization types") from e
    # The dequantized weights are plain tensors now; drop the GGUF marker so the folder loads as a float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(
            {"gguf_file": str(src.resolve()), "bytes": src.stat().st_size, "dtype": dtype}, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp's folder is private; a model folder is not
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s (%s, %s)", src, dst, model.config.model_type, dtype)
    return dst
