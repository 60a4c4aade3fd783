"""The stage contract: atomic output folders with a manifest, and checks of a parent folder.

A stage trains in ``<output_dir>.partial`` (checkpoints live there, so ``--resume`` finds them) and
renames it to ``<output_dir>`` only when everything, manifest last, is written. A folder without
``manifest.json`` is never a finished stage. One process writes a stage at a time (a lock), a replaced finished
folder is swapped out atomically, and a checkpoint is complete by one definition (docs/crash_safety.md).
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from rlhf.dist import launch_info, process_state
from rlhf.errors import StageError
from rlhf.stages import STAGES  # the stage table only (strings): no stage module is imported

log = logging.getLogger("rlhf")

MANIFEST = "manifest.json"


def work_dir(output_dir: str | Path) -> Path:
    return Path(str(Path(output_dir)) + ".partial")


def aside_dir(output_dir: str | Path) -> Path:
    """Where finish_output moves the finished folder it replaces, until the new one is in place."""
    return Path(str(Path(output_dir)) + ".old.partial")


_LOCKS: dict[str, int] = {}  # lock file -> descriptor this process holds (until finish_output or exit)


def lock_output(output_dir: str | Path) -> None:
    """Hold ``<output_dir>.lock`` (flock) so that no second process writes the same stage at once. The kernel
    drops the lock when the process dies, so a SIGKILL never leaves a stale one. Re-entrant in one process."""
    path = str(Path(output_dir)) + ".lock"
    if path in _LOCKS:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StageError(f"{output_dir} is being written by another running process (pid {pid}, lock {path}); wait "
                             "for it to end or stop it: two runs in one folder would mix their checkpoints") from None
        try:  # the file may have been removed by a run that finished while we waited: then lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[path] = fd
    # a run that fails leaves no lock file either (a killed one does: harmless)
    atexit.register(unlock_output, output_dir)


def unlock_output(output_dir: str | Path) -> None:
    path = str(Path(output_dir)) + ".lock"
    if (fd := _LOCKS.pop(path, None)) is not None:
        os.unlink(path)
        os.close(fd)


REQUEST = "requested_config.json"
VOLATILE = ("resume", "overwrite_output_dir")  # keys that do not change what a stage produces


def same_request(a: dict | None, b: dict | None) -> bool:
    """Do two requested configs ask for the same result (ignoring resume/overwrite flags)?"""
    if a is None or b is None:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE}  # noqa: E731
    return json.loads(json.dumps(strip(a), default=str)) == json.loads(json.dumps(strip(b), default=str))


def prepare_output(output_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                   requested: dict | None = None) -> Path:
    """Lock, then create (or reuse, with ``resume``) the working folder of a stage and return it.

    Call it once the config, data and tokenizer are checked: a run that fails before it leaves no folder. A
    working folder without a complete checkpoint is no unfinished run: it is replaced without asking.
    ``requested`` is the stage config as given; it is kept in the working folder and ends up in the
    manifest, so a rerun can tell whether a finished or interrupted run was asked for the same thing.
    Under several processes (accelerate/torchrun) the main one holds the lock; every process checks, then the
    main one writes.
    """
    state = process_state()
    out, work = Path(output_dir), work_dir(output_dir)
    if not str(output_dir):
        raise StageError("output_dir is empty: set output_dir in the config or pass --output-dir DIR")
    if state.is_main_process:
        lock_output(out)
    if out.exists() and not overwrite:
        raise StageError(f"{out} already holds a finished stage; pass --overwrite-output-dir true to replace it, or "
                         "choose another output_dir")
    if work.exists() and not resume and not overwrite and last_checkpoint(work):
        raise StageError(f"{work} holds an unfinished run; pass --resume true to continue it, or "
                         "--overwrite-output-dir true to start over")
    if resume and not work.exists():
        raise StageError(f"--resume: no unfinished run at {work} to continue")
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(aside_dir(out), ignore_errors=True)  # left by a finish_output killed mid-swap
        if work.exists() and not resume:
            log.info("%s: starting over (%s)", work,
                     "--overwrite-output-dir" if overwrite else "it holds no checkpoint to resume")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if requested is not None:
            old = json.loads((work / REQUEST).read_text()) if (work / REQUEST).is_file() else None
            if resume and old is not None and not same_request(old, requested):
                changed = sorted(k for k in set(old) | set(requested)
                                 if k not in VOLATILE and old.get(k) != requested.get(k))
                log.warning("resuming %s with changed keys: %s", work, ", ".join(changed))
            (work / REQUEST).write_text(json.dumps(requested, indent=2, default=str))
    state.wait_for_everyone()
    return work


def checkpoints(work: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders under ``work/checkpoints``, oldest first (PPO's ``checkpoint-N.tmp`` is none)."""
    found = [p for p in Path(work, "checkpoints").glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None. The one definition for every stage: its
    ``trainer_state.json`` (which the HF Trainer writes last; PPO renames a finished ``.tmp`` folder) parses,
    it holds weights (``*.safetensors``, or DeepSpeed's ``global_step*``) whose headers read, and its
    ``optimizer.pt``, if any, loads weights-only (a file that needs unpickling is refused, never run)."""
    import torch
    from safetensors import safe_open

    ckpt = Path(ckpt)
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json: {type(e).__name__}: {e}"
    weights = list(ckpt.rglob("*.safetensors"))
    if not weights and not any(ckpt.glob("global_step*")):
        return "no weights"
    for f in [*weights, *ckpt.glob("optimizer.pt")]:
        try:
            if f.suffix == ".safetensors":
                safe_open(str(f), "pt").keys()
            else:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means damaged
            return f"{f.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def last_checkpoint(work: str | Path) -> str | None:
    """The newest complete checkpoint under ``work/checkpoints`` (see checkpoint_problem)."""
    return next((str(c) for c in reversed(checkpoints(work)) if checkpoint_problem(c) is None), None)


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit) if limit else f.read())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """A short hash of a base model's config and weight index (or weights), or its hub id."""
    p = Path(path).expanduser()  # a config's ~/.cache/... folder is a folder, not a hub id
    if not p.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (p / name).is_file():
            h.update((p / name).read_bytes())
    if not any((p / n).is_file() for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
        for w in sorted(p.glob("*.safetensors")):  # single-file weights: hash their first MiB and size
            with open(w, "rb") as fh:  # the first MiB only: check_parent fingerprints the base at every start
                h.update(fh.read(1 << 20))
            h.update(str(w.stat().st_size).encode())
    return h.hexdigest()[:16]


def base_record(path: str) -> dict:
    """How a manifest records a base model: a local folder by its absolute path (the stage folder works from any
    directory), a hub id as it is; with its fingerprint."""
    p = Path(path).expanduser()
    return {"path": str(p.resolve()) if p.is_dir() else path, "fingerprint": model_fingerprint(path)}


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
        parent_info = {"path": str(Path(parent).resolve()), "stage": read_manifest(parent)["stage"],
                       "manifest_sha256": file_sha256(pm)}
    manifest = {
        "stage": stage,
        "base_model": base_record(base_model),
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
    old = aside_dir(out)  # a finished folder being replaced (overwrite was checked in prepare_output): aside, new in,
    shutil.rmtree(old, ignore_errors=True)  # then deleted, so a kill anywhere never leaves a half-deleted stage
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    unlock_output(out)
    return out


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise StageError(f"{folder} is not a finished stage folder (no {MANIFEST})")
    try:
        m = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"{p}: damaged, not valid JSON ({e}); rerun the stage that wrote {folder}") from None
    if not isinstance(m, dict) or not isinstance(m.get("base_model"), dict):
        raise StageError(f"{p}: damaged, not an rlhf manifest (no base_model); rerun the stage that wrote {folder}")
    return m


def _command(stage) -> str:
    """The command that writes a ``stage`` folder (``rlhf sft``), or the name as recorded when it is no stage."""
    return STAGES[stage].command if stage in STAGES else str(stage)


def check_parent(folder: str | Path | None, expect: str | tuple[str, ...], *, for_stage: str,
                 base_model: str | None = None, base_option: str = "model_name_or_path") -> dict:
    """Check that ``folder`` is a finished output of stage ``expect``; return its manifest.

    The base model recorded there, when it was a local folder, must still be there and the one on disk (its
    fingerprint); ``base_model`` (the user's ``base_option``, for a base that moved) replaces it and must have the
    recorded fingerprint. A relative path (an older manifest) is read from the current directory. Errors say what
    is wrong and what to run first.
    """
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    run_first = " or ".join(_command(e) for e in expect)
    if not folder:
        raise StageError(f"{for_stage}: no {'/'.join(expect)} folder given; run {run_first} first and name its "
                         "output_dir")
    f = Path(folder)
    if not f.exists():
        if work_dir(f).exists():
            raise StageError(f"{f} did not finish ({work_dir(f)} is an interrupted run): resume it with `{run_first} "
                             "CONFIG --resume true`")
        raise StageError(f"{f} does not exist: run {run_first} first (its output_dir), or fix the path")
    m = read_manifest(f)
    if m.get("stage") not in expect:
        raise StageError(f"{f} is the output of `{_command(m.get('stage'))}`, but {for_stage} needs a "
                         f"{'/'.join(expect)} folder: run {run_first} first")
    if m.get("stage") != "pt":
        for needed in ("adapter_config.json",):
            if (m.get("config", {}).get("finetuning_type", "lora") == "lora") and not (f / needed).is_file():
                raise StageError(f"{f} is missing {needed}: the folder is damaged; rerun {run_first}")
    recorded, have = m["base_model"].get("path"), m["base_model"].get("fingerprint")
    if base_model is not None:
        if (want := model_fingerprint(base_model)) != have:
            raise StageError(
                f"{f} was trained on base model {recorded} (fingerprint {have}), not {base_model} ({want}): "
                f"give {base_option} the same base, or rerun {run_first} on {base_model}")
        return m
    local = bool(recorded) and not str(have or "").startswith("hub:")  # model_fingerprint marks hub ids
    if local and not Path(recorded).is_dir():
        raise StageError(f"{f} was trained on base model {recorded}, which is not there (moved?): pass its new "
                         f"place with {base_option} PATH (checked against the recorded fingerprint {have})")
    if local and model_fingerprint(recorded) != have:
        raise StageError(
            f"{f} was trained on base model {recorded} (fingerprint {have}), but the model now in {recorded} is "
            f"another one ({model_fingerprint(recorded)}): put the original base back, or pass it with {base_option} "
            f"PATH, or rerun {run_first} on the new one"
        )
    return m
