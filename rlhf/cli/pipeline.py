"""`rlhf pipeline`: run pt -> sft -> rm -> ppo (and dpo, grpo) from one YAML, skipping what is already done.

    output_root: runs/demo            # each stage writes output_root/<stage>
    shared: {seed: 42}                # keys given to every stage whose config has them
    stages:                           # in this order; any subset
      pt: configs/demo/pt.yaml
      sft: {config: configs/demo/sft.yaml, learning_rate: 1.0e-3}   # a file plus inline keys
      rm: configs/demo/rm.yaml
      ppo: configs/demo/ppo.yaml
      dpo: configs/demo/dpo.yaml      # from sft
      grpo: configs/demo/grpo.yaml    # from sft (and rm, when its config names rm_dir)

    launch: {launcher: accelerate, num_processes: 2}              # optional: run stages under several processes
      # launcher: accelerate (with config_file: configs/accelerate/....yaml) or torchrun; args: [extra launcher args]
      # a stage entry may carry its own `launch:` (or `launch: false` to run in this process); pt runs in this one

A stage is skipped when its folder is finished and its manifest shows the same requested config, the
same dataset fingerprints and the same parent manifest; otherwise it runs (resuming an interrupted run
of the same config), and every stage after it runs too. Stage links are filled in: sft reads pt's
folder as its base, rm reads sft, ppo reads sft and rm, dpo reads sft, grpo reads sft and, when the pipeline
has an rm stage, rm (the stage table's parents, stages/__init__.py); a link key set to "" in the stage's config
(grpo's `rm_dir: ""`, a Python reward only) stays empty.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import click

from rlhf.stages import STAGES  # run order and parent links

PIPELINE_KEYS = {"output_root", "shared", "stages", "launch"}
LAUNCH_KEYS = {"launcher", "num_processes", "config_file", "args"}


def launch_spec(raw, where: str, base_dir: Path) -> dict | None:
    """A checked `launch:` mapping (None: run the stage in this process); config_file may be relative to base_dir."""
    from rlhf.config import ConfigError, nearest

    if raw is None or raw is False:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: `launch:` must be a mapping (launcher, num_processes, config_file, args) or false")
    if unknown := set(raw) - LAUNCH_KEYS:
        k = sorted(unknown)[0]
        raise ConfigError(f"{where}: unknown launch key '{k}'{nearest(k, LAUNCH_KEYS)}")
    spec = {"launcher": raw.get("launcher", "accelerate"), "num_processes": raw.get("num_processes"),
            "config_file": raw.get("config_file"), "args": [str(a) for a in raw.get("args") or []]}
    if spec["launcher"] not in ("accelerate", "torchrun"):
        raise ConfigError(f"{where}: launch.launcher must be accelerate or torchrun, not {spec['launcher']!r}")
    n = spec["num_processes"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"{where}: launch.num_processes must be a whole number >= 1, not {n!r}")
    if spec["launcher"] == "torchrun" and (n is None or spec["config_file"]):
        raise ConfigError(f"{where}: torchrun needs launch.num_processes and takes no config_file (that is "
                          "accelerate's)")
    if (f := spec["config_file"]) and not Path(f).is_file() and (base_dir / f).is_file():
        spec["config_file"] = str(base_dir / f)
    if spec["config_file"] and not Path(spec["config_file"]).is_file():
        raise ConfigError(f"{where}: launch.config_file {spec['config_file']} does not exist (see configs/accelerate/)")
    return spec


def launch_command(spec: dict, stage: str, config_file: str) -> list[str]:
    """The command that runs ``rlhf <stage> <config_file>`` under the launcher of ``spec``."""
    n, extra = spec["num_processes"], spec["args"]
    with socket.socket() as sock:  # a free rendezvous port, so two pipelines on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    if spec["launcher"] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
        if not any(a.startswith(("--master_port", "--rdzv")) for a in extra):
            cmd += ["--master_addr", "127.0.0.1", "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if spec["config_file"]:
            cmd += ["--config_file", spec["config_file"]]
        elif (n or 1) > 1:
            cmd += ["--multi_gpu"]  # accelerate's data-parallel launcher; with no GPU the processes use gloo on CPUs
        if n:
            cmd += ["--num_processes", str(n)]
        if not any(a.startswith("--main_process_port") for a in extra):
            cmd += ["--main_process_port", port]
    return cmd + extra + ["-m", "rlhf", stage, config_file]


def run_launched(spec: dict, stage: str, cfg, root: Path, pipeline_file: str) -> None:
    """Run one stage in new processes: its resolved config goes to a YAML file that `rlhf <stage>` reads."""
    import yaml

    from rlhf.config import to_dict
    from rlhf.manifest import StageError

    cfg_file = root / ".pipeline" / f"{stage}.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cmd = launch_command(spec, stage, str(cfg_file))
    click.echo(f"[pipeline] {stage}: {' '.join(cmd[1:])}")
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise StageError(f"{stage} failed under {spec['launcher']} (exit code {rc}; its output is above). Fix the "
                         "cause and "
                         f"rerun `rlhf pipeline {pipeline_file}`: it resumes the stage from its last checkpoint")


def stage_configs(path: str, overrides: dict | None = None,
                  output_root: str | None = None) -> list[tuple[str, object, dict | None]]:
    """(stage, typed config, launch spec) in run order, with shared keys, links and output folders filled in."""
    from rlhf.config import ConfigError, build, fields_of, nearest, read_yaml

    spec = read_yaml(path)
    if unknown := set(spec) - PIPELINE_KEYS:
        k = sorted(unknown)[0]
        raise ConfigError(f"{path}: unknown key '{k}'{nearest(k, PIPELINE_KEYS)}")
    stages = spec.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: `stages:` must map stage names ({', '.join(STAGES)}) to config files")
    if bad := [s for s in stages if s not in STAGES]:
        raise ConfigError(f"{path}: unknown stage '{bad[0]}'{nearest(bad[0], list(STAGES))}")
    root = Path(output_root or spec.get("output_root", "runs/pipeline"))
    shared = {**(spec.get("shared") or {}), **(overrides or {})}
    default_launch = launch_spec(spec.get("launch"), path, Path(path).parent)
    out = []
    for stage in [s for s in STAGES if s in stages]:
        entry = stages[stage]
        entry = {"config": entry} if isinstance(entry, str) else dict(entry or {})
        launch = launch_spec(entry.pop("launch"), f"{path} (stages.{stage})",
                             Path(path).parent) if "launch" in entry else default_launch
        if stage == "pt" and launch:
            if "launch" in (stages[stage] if isinstance(stages[stage], dict) else {}):
                raise ConfigError(f"{path} (stages.pt): pt trains its small base in one process; drop its `launch:`")
            launch = None  # the pipeline-wide launch is for sft, rm and ppo
        cls = STAGES[stage].config_class()
        valid = fields_of(cls)
        values, where = {}, {}
        if file := entry.pop("config", None):
            file = str(Path(path).parent / file) if not Path(file).exists() else file
            for k, v in read_yaml(file).items():
                values[k], where[k] = v, file
        for k, v in shared.items():
            if k.replace("-", "_") in valid:
                values[k.replace("-", "_")], where[k] = v, f"{path} (shared)"
        for k, v in entry.items():
            values[k], where[k] = v, f"{path} (stages.{stage})"
        values["output_dir"] = str(root / stage)
        for key, parent in STAGES[stage].parents:
            if parent in stages and not (key in values and values[key] in ("", None)):  # "" : none (grpo's rm_dir)
                values[key] = str(root / parent)
        out.append((stage, build(cls, values, where), launch))
    return out


def _parent_hashes(manifest: dict) -> str | None:
    return (manifest.get("parent") or {}).get("manifest_sha256")


def up_to_date(stage: str, cfg) -> tuple[bool, str]:
    """Is the stage's finished folder the result of this config, data and parent? (and why not)"""
    from rlhf.config import to_dict
    from rlhf.data import fingerprint
    from rlhf.manifest import MANIFEST, file_sha256, read_manifest, same_request

    out = Path(cfg.output_dir)
    if not (out / MANIFEST).is_file():
        return False, "not run yet" if not out.exists() else "unfinished"
    m = read_manifest(out)
    if not same_request(m.get("requested"), to_dict(cfg)):
        old, new = m.get("requested") or {}, to_dict(cfg)
        changed = sorted(k for k in set(old) | set(new)
                         if k not in ("resume", "overwrite_output_dir") and old.get(k) != new.get(k))
        return False, f"config changed ({', '.join(changed)})"
    names = list(getattr(cfg, "dataset", [])) + list(getattr(cfg, "eval_dataset", []))
    if names and fingerprint(names, getattr(cfg, "registry_file", None)) != m.get("datasets"):
        return False, "dataset content changed"
    parent_dir = (m.get("parent") or {}).get("path")
    if parent_dir:
        p = Path(parent_dir) / MANIFEST
        if not p.is_file() or file_sha256(p) != _parent_hashes(m):
            return False, "parent stage changed"
    return True, "up to date"


def run_pipeline(path: str, *, start: str | None = None, only: str | None = None, overrides: dict | None = None,
                 output_root: str | None = None) -> list[tuple[str, str]]:
    """Run the pipeline; returns (stage, what happened) for each stage."""
    from rlhf.config import to_dict
    from rlhf.data import DataError, check_names
    from rlhf.errors import disk_errors
    from rlhf.manifest import REQUEST, same_request, work_dir

    plan = stage_configs(path, overrides, output_root)  # every stage's config checked before any stage starts
    for stage, cfg, _ in plan:
        try:
            check_names(cfg)
        except DataError as e:
            raise DataError(f"{path} (stages.{stage}): {e}") from None
    names = [s for s, _, _ in plan]
    for flag, value in (("--from", start), ("--only", only)):
        if value and value not in names:
            raise click.UsageError(f"{flag} {value}: the pipeline's stages are {', '.join(names)}")
    report, dirty = [], False
    for stage, cfg, launch in plan:
        if only and stage != only:
            continue
        forced = start is not None and names.index(stage) >= names.index(start)
        ok, why = up_to_date(stage, cfg)
        if ok and not dirty and not forced and not only:
            click.echo(f"[pipeline] {stage}: {why}, skipped ({cfg.output_dir})")
            report.append((stage, "skipped"))
            continue
        work = work_dir(cfg.output_dir)
        old = json.loads((work / REQUEST).read_text()) if (work / REQUEST).is_file() else None
        resume = work.exists() and same_request(old, to_dict(cfg)) and hasattr(cfg, "resume")
        if hasattr(cfg, "resume"):
            cfg.resume = resume
        cfg.overwrite_output_dir = True
        click.echo(f"[pipeline] {stage}: {'resuming interrupted run' if resume else 'running'} "
                   f"({why if not forced else 'asked to'}) -> {cfg.output_dir}")
        if launch:
            run_launched(launch, stage, cfg, Path(cfg.output_dir).parent, path)
        else:
            with disk_errors(cfg.output_dir):
                STAGES[stage].load().run(cfg)
        report.append((stage, "resumed" if resume else "ran"))
        dirty = True
    return report


def lineage(folder: str) -> list[dict]:
    """The manifest of ``folder`` and of each parent up the chain (child first)."""
    from rlhf.manifest import read_manifest

    chain, f = [], folder
    while f:
        m = read_manifest(f)
        chain.append({"folder": str(f), **m})
        rm_dir = m.get("config", {}).get("rm_dir")  # PPO's and GRPO's second parent: the reward model
        if m.get("stage") in ("ppo", "grpo") and rm_dir and Path(rm_dir, "manifest.json").is_file():
            chain.append({"folder": str(rm_dir), **read_manifest(rm_dir)})
        f = (m.get("parent") or {}).get("path")
        if f is None and m.get("stage") in ("sft",) and Path(m["base_model"]["path"], "manifest.json").is_file():
            f = m["base_model"]["path"]  # an SFT on our own pre-trained base: show the pt stage too
    return chain


KEY_HPARAMS = ("quantization", "finetuning_type", "lora_r", "lora_alpha", "lora_target", "learning_rate", "max_steps",
               "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "kl_coef", "beta",
               "loss_type", "num_generations", "seed")


def format_lineage(chain: list[dict]) -> str:
    lines = []
    base = chain[-1]["base_model"]
    lines.append(f"base model: {base['path']} (fingerprint {base['fingerprint']})")
    for m in reversed(chain):
        cfg = m.get("config", {})
        lines.append(f"\n{m['stage']}: {m['folder']}")
        if m.get("parent"):
            lines.append(f"  parent: {m['parent']['path']} (manifest sha256 {m['parent']['manifest_sha256'][:12]})")
        for name, fp in (m.get("datasets") or {}).items():
            lines.append(f"  dataset: {name} ({str(fp)[:16]})")
        hp = {k: cfg[k] for k in KEY_HPARAMS if k in cfg}
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in hp.items()))
        metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k,
                   v in (m.get("metrics") or {}).items() if v is not None}
        lines.append(f"  metrics: {json.dumps(metrics)}")
        if m.get("wall_seconds") is not None:
            lines.append(f"  wall time: {m['wall_seconds']:.1f} s")
    return "\n".join(lines)


@click.command("pipeline", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config")
@click.option("--from", "start", default=None, help="Rerun this stage and every one after it, even if up to date.")
@click.option("--only", default=None, help="Run only this stage (its parents must be finished).")
@click.option("--output-root", default=None, help="Write the stage folders here instead of the file's output_root.")
@click.pass_context
def pipeline_cmd(ctx, config, start, only, output_root):
    """Run the stages named in CONFIG (pt, sft, rm, ppo) in order; skip those already done.

    Extra --key value options override that key in every stage that has it.
    """
    from rlhf.config import parse_overrides
    from rlhf.logging_utils import setup_logging

    setup_logging()
    report = run_pipeline(config, start=start, only=only, overrides=parse_overrides(ctx.args), output_root=output_root)
    click.echo("[pipeline] " + ", ".join(f"{s}: {w}" for s, w in report))


@click.command("inspect")
@click.argument("folder")
@click.option("--json", "as_json", is_flag=True, help="Print the manifests of the chain as JSON.")
def inspect_cmd(folder, as_json):
    """Print a stage folder's lineage: base model, each stage, datasets, key settings, final metrics."""
    chain = lineage(folder)
    click.echo(json.dumps(chain, indent=2, default=str) if as_json else format_lineage(chain))
