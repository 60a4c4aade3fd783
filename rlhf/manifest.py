"""The stage contract: atomic output folders with a manifest, and checks of a parent folder.

A stage trains in ``<output_dir>.partial`` (checkpoints live there, so ``--resume`` finds them) and
renames it to ``<output_dir>`` only when everything, manifest last, is written. A folder without
``manifest.json`` is never a finished stage.
"""
from __future__ import annotations

from rlhf.errors import RlhfError

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
ORDER = {"pt": "rlhf pt", "sft": "rlhf sft", "rm": "rlhf rm", "ppo": "rlhf ppo"}


class StageError(RlhfError, RuntimeError):
    """A stage folder that is missing, unfinished, of the wrong kind, or from another base model."""


def work_dir(output_dir: str | Path) -> Path:
    return Path(str(Path(output_dir)) + ".partial")


REQUEST = "requested_config.json"
VOLATILE = ("resume", "overwrite_output_dir")  # keys that do not change what a stage produces


def same_request(a: dict | None, b: dict | None) -> bool:
    """Do two requested configs ask for the same result (ignoring resume/overwrite flags)?"""
    if a is None or b is None:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE}  # noqa: E731
    return json.loads(json.dumps(strip(a), default=str)) == json.loads(json.dumps(strip(b), default=str))


def fsdp_launch() -> bool:
    """Was this process started by `accelerate launch` with an FSDP config?"""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def process_state():
    """accelerate's process state (rank, world size); CPU-only machines use gloo (torchrun/accelerate launch)."""
    import torch
    from accelerate import PartialState

    if fsdp_launch() and not torch.cuda.is_available():
        raise StageError("FSDP needs GPUs: accelerate runs FSDP only on GPU-type devices and on CPUs silently falls back "
                         "to plain data parallel; launch with configs/accelerate/cpu.yaml or a DeepSpeed config instead")
    return PartialState(cpu=not torch.cuda.is_available())


def launch_info(accelerator=None) -> dict:
    """How a run was spread: number of processes, accelerate's distributed type, DeepSpeed's ZeRO stage."""
    state = accelerator.state if accelerator is not None else process_state()
    info = {"num_processes": state.num_processes, "distributed_type": state.distributed_type.value}
    if getattr(state, "deepspeed_plugin", None) is not None:
        info["zero_stage"] = state.deepspeed_plugin.zero_stage
    return info


def prepare_output(output_dir: str | Path, *, resume: bool = False, overwrite: bool = False, requested: dict | None = None) -> Path:
    """Create (or reuse, with ``resume``) the working folder of a stage and return it.

    ``requested`` is the stage config as given; it is kept in the working folder and ends up in the
    manifest, so a rerun can tell whether a finished or interrupted run was asked for the same thing.
    Under several processes (accelerate/torchrun) every process checks, then the main one writes.
    """
    state = process_state()
    out, work = Path(output_dir), work_dir(output_dir)
    if not str(output_dir):
        raise StageError("output_dir is empty: set output_dir in the config or pass --output-dir DIR")
    if out.exists() and not overwrite:
        raise StageError(f"{out} already holds a finished stage; pass --overwrite-output-dir true to replace it, or choose another output_dir")
    if work.exists() and not resume and not overwrite:
        raise StageError(f"{work} holds an unfinished run; pass --resume true to continue it, or --overwrite-output-dir true to start over")
    if resume and not work.exists():
        raise StageError(f"--resume: no unfinished run at {work} to continue")
    state.wait_for_everyone()
    if state.is_main_process:
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if requested is not None:
            old = json.loads((work / REQUEST).read_text()) if (work / REQUEST).is_file() else None
            if resume and old is not None and not same_request(old, requested):
                changed = sorted(k for k in set(old) | set(requested) if k not in VOLATILE and old.get(k) != requested.get(k))
                import logging

                logging.getLogger("rlhf").warning("resuming %s with changed keys: %s", work, ", ".join(changed))
            (work / REQUEST).write_text(json.dumps(requested, indent=2, default=str))
    state.wait_for_everyone()
    return work


def last_checkpoint(work: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder under ``work/checkpoints``."""
    ckpts = sorted(Path(work, "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit) if limit else f.read())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """A short hash of a base model's config and weight index (or weights), or its hub id."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (p / name).is_file():
            h.update((p / name).read_bytes())
    if not any((p / n).is_file() for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
        for w in sorted(p.glob("*.safetensors")):  # single-file weights: hash their first MiB and size
            h.update(w.read_bytes()[: 1 << 20])
            h.update(str(w.stat().st_size).encode())
    return h.hexdigest()[:16]


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("rlhf", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def finish_output(
    work: str | Path,
    output_dir: str | Path,
    *,
    stage: str,
    config: dict,
    base_model: str,
    parent: str | Path | None = None,
    datasets: dict | None = None,
    metrics: dict | None = None,
    started: float | None = None,
    launch: dict | None = None,
) -> Path:
    """Write ``manifest.json`` into the working folder, then rename it to ``output_dir``.

    ``config`` is the resolved config (parent paths, template filled in); ``requested`` the config as
    given, before the stage resolved it (kept by ``prepare_output``; the pipeline compares it).
    """
    work, out = Path(work), Path(output_dir)
    parent_info = None
    if parent:
        pm = Path(parent) / MANIFEST
        parent_info = {"path": str(Path(parent).resolve()), "stage": read_manifest(parent)["stage"], "manifest_sha256": file_sha256(pm)}
    manifest = {
        "stage": stage,
        "base_model": {"path": base_model, "fingerprint": model_fingerprint(base_model)},
        "parent": parent_info,
        "datasets": datasets or {},
        "config": config,
        "requested": json.loads((work / REQUEST).read_text()) if (work / REQUEST).is_file() else config,
        "metrics": metrics or {},
        "launch": launch or launch_info(),
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
        "wall_seconds": round(time.time() - started, 2) if started else None,
    }
    tmp = work / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, work / MANIFEST)
    if out.exists():  # overwrite was asked for and checked in prepare_output
        shutil.rmtree(out)
    os.replace(work, out)
    return out


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise StageError(f"{folder} is not a finished stage folder (no {MANIFEST})")
    return json.loads(p.read_text())


def check_parent(folder: str | Path | None, expect: str | tuple[str, ...], *, for_stage: str, base_model: str | None = None) -> dict:
    """Check that ``folder`` is a finished output of stage ``expect``; return its manifest.

    Errors say what is wrong and what to run first.
    """
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    run_first = " or ".join(ORDER.get(e, e) for e in expect)
    if not folder:
        raise StageError(f"{for_stage}: no {'/'.join(expect)} folder given; run {run_first} first and name its output_dir")
    f = Path(folder)
    if not f.exists():
        if work_dir(f).exists():
            raise StageError(f"{f} did not finish ({work_dir(f)} is an interrupted run): resume it with `{run_first} CONFIG --resume true`")
        raise StageError(f"{f} does not exist: run {run_first} first (its output_dir), or fix the path")
    m = read_manifest(f)
    if m.get("stage") not in expect:
        raise StageError(f"{f} is the output of `{ORDER.get(m.get('stage'), m.get('stage'))}`, but {for_stage} needs a {'/'.join(expect)} folder: run {run_first} first")
    if m.get("stage") != "pt":
        for needed in ("adapter_config.json",):
            if (m.get("config", {}).get("finetuning_type", "lora") == "lora") and not (f / needed).is_file():
                raise StageError(f"{f} is missing {needed}: the folder is damaged; rerun {run_first}")
    if base_model is not None:
        want = model_fingerprint(base_model)
        have = m["base_model"]["fingerprint"]
        if want != have:
            raise StageError(
                f"{f} was trained on base model {m['base_model']['path']} (fingerprint {have}), not {base_model} ({want}): "
                f"use the same base, or rerun {run_first} on {base_model}"
            )
    return m
