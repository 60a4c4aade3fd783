"""The stages of benchmarks/gpu_check.sh: each stage in its own process, measured, then one results file.

    python benchmarks/gpu_check.py --out runs/gpu_check             # what gpu_check.sh runs on a GPU
    python benchmarks/gpu_check.py --out /tmp/gc --dry-run          # CPU, a few steps per stage (the test runs this)

Chains: the demo (pt -> sft -> rm -> ppo on configs/demo/, sft/rm/ppo on a 4-bit base, bf16 autocast, weights in
bf16 on a GPU) and the real model (configs/smollm2-135m/: SmolLM2-135M-Instruct, when scripts/fetch_smollm2.py
has put it in its cache; skipped with a line saying so when it has not). Per stage: wall time, peak GPU memory
(torch.cuda.max_memory_allocated and _reserved of the stage's process) beside `rlhf estimate`'s peak for the
config it ran with (rlhf/estimate.py), and throughput: sft/rm tokens per second of training (the logged
num_tokens over train_runtime), PPO's rollout and update tokens per second (the response tokens of each step
over time_rollout and time_update, from train_log.jsonl). Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("RLHF_CACHE", "~/.cache/rlhf")).expanduser() / "smollm2" / "SmolLM2-135M-Instruct"

# Dry run: a few steps per stage, so the whole chain runs on a CPU in well under a minute
DRY = {"pt": ["--max-steps", "4", "--num-samples", "200"],
       "sft": ["--max-steps", "2", "--task-eval-samples", "4", "--num-samples", "64", "--eval-steps", "2"],
       "rm": ["--max-steps", "2", "--num-samples", "64", "--eval-steps", "2"],
       "ppo": ["--max-steps", "1", "--batch-size", "4", "--mini-batch-size", "4", "--per-device-train-batch-size", "4",
               "--num-samples", "16", "--eval-samples", "4", "--eval-steps", "1", "--save-steps", "1"]}


def stage_child(stage: str, argv: list[str], result: str) -> None:
    """Run one stage in this process (rlhf's command line) and write its time and peak GPU memory to ``result``."""
    import torch

    from rlhf.cli import cli

    t = time.time()
    cli.main(args=[stage, *argv], standalone_mode=False)
    out = {"stage": stage, "wall_s": time.time() - t, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, gpu=torch.cuda.get_device_name(0))
    Path(result).write_text(json.dumps(out))


def estimate_gib(folder: Path, stage: str) -> float | None:
    """`rlhf estimate`'s peak (GiB) for the config the finished stage folder records, on a GPU."""
    from rlhf.estimate import load_shape, setup_from_config, stage_estimate
    from rlhf.stages import STAGES

    manifest = json.loads((folder / "manifest.json").read_text())
    cls = STAGES[stage].config_class()
    cfg = cls(**{k: v for k, v in manifest["config"].items() if k in cls.__dataclass_fields__})
    setup, ppo = setup_from_config(cfg, stage, device="cuda")
    return stage_estimate(stage, load_shape(str(manifest["base_model"]["path"])), setup, **ppo).peak / 2**30


def throughput(folder: Path, stage: str) -> dict:
    """Tokens per second from the stage's train_log.jsonl."""
    log = folder / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if stage == "ppo":
        steps = [r for r in rows if "time_rollout" in r and "tokens_per_s" in r]
        tokens = sum(r["tokens_per_s"] * (r["time_rollout"] + r["time_update"]) for r in steps)
        roll, upd = sum(r["time_rollout"] for r in steps), sum(r["time_update"] for r in steps)
        return {"rollout_tokens_per_s": tokens / roll if roll else None,
                "update_tokens_per_s": tokens / upd if upd else None}
    end = [r for r in rows if "train_runtime" in r]
    seen = [r["num_tokens"] for r in rows if "num_tokens" in r]
    if stage in ("sft", "pt") and end and seen:
        return {"train_tokens_per_s": seen[-1] / end[-1]["train_runtime"]}
    return {"train_samples_per_s": end[-1].get("train_samples_per_second")} if end else {}


def chains(out: Path, dry: bool) -> list[tuple[str, str, list[str]]]:
    """(chain, stage, command-line arguments) in run order."""
    demo, bf16 = out / "demo", ["--bf16", "true"]
    runs = [("demo", "pt", ["configs/demo/pt.yaml", "--output-dir", str(demo / "pt")]),
            ("demo", "sft", ["configs/demo/sft.yaml", "--model-name-or-path", str(demo / "pt"), "--output-dir",
                             str(demo / "sft"), "--quantization", "4bit", *bf16]),
            ("demo", "rm", ["configs/demo/rm.yaml", "--sft-dir", str(demo / "sft"), "--output-dir", str(demo / "rm"),
                            *bf16]),
            ("demo", "ppo", ["configs/demo/ppo.yaml", "--sft-dir", str(demo / "sft"), "--rm-dir", str(demo / "rm"),
                             "--output-dir", str(demo / "ppo"), *bf16])]
    if SMOLLM2.is_dir():
        real = out / "smollm2"
        runs += [("smollm2-135m", "sft", ["configs/smollm2-135m/sft.yaml", "--model-name-or-path", str(SMOLLM2),
                                          "--output-dir", str(real / "sft"), "--quantization", "4bit", *bf16]),
                 ("smollm2-135m", "rm", ["configs/smollm2-135m/rm.yaml", "--sft-dir", str(real / "sft"),
                                         "--output-dir", str(real / "rm"), *bf16]),
                 ("smollm2-135m", "ppo", ["configs/smollm2-135m/ppo.yaml", "--sft-dir", str(real / "sft"), "--rm-dir",
                                          str(real / "rm"), "--output-dir", str(real / "ppo"), *bf16])]
    if dry:
        runs = [(c, s, [*a, *DRY[s], "--bf16", "false"] if "--bf16" in a else [*a, *DRY[s]]) for c, s, a in runs]
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a few steps per stage: checks the script")
    ap.add_argument("--stage-child", nargs=2, metavar=("STAGE", "RESULT"), help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.stage_child:
        return stage_child(args.stage_child[0], rest, args.stage_child[1])

    import torch

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("Error: no CUDA device visible to torch; run with --dry-run to check the script on a CPU")
    results, notes = [], []
    if not SMOLLM2.is_dir():
        notes.append(f"real-model chain skipped: {SMOLLM2} is absent (python scripts/fetch_smollm2.py fetches it; a "
                     "machine with no registry needs the folder copied in, or RLHF_CACHE pointed at one)")
        print(notes[-1], flush=True)
    for chain, stage, argv in chains(out, args.dry_run):
        res = out / f"{chain}_{stage}.json"
        t = time.time()
        print(f"== {chain} {stage}: rlhf {stage} {' '.join(argv)}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--stage-child", stage, str(res), *argv], cwd=ROOT)
        if done.returncode:
            results.append({"chain": chain, "stage": stage, "error": f"exit {done.returncode}",
                            "wall_s": time.time() - t})
            print(f"== {chain} {stage} failed (exit {done.returncode}); the stages after it are skipped", flush=True)
            break
        r = {"chain": chain, **json.loads(res.read_text())}
        folder = Path(argv[argv.index("--output-dir") + 1])
        if stage != "pt":
            r["estimate_peak_gib"] = estimate_gib(folder, stage)
        r.update(throughput(folder, stage))
        results.append(r)
    write_results(out, results, notes, args.dry_run)


def write_results(out: Path, results: list[dict], notes: list[str], dry: bool) -> None:
    import torch

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    gpu = next((r["gpu"] for r in results if r.get("gpu")), None)
    head = (f"GPU check ({'dry run on CPU' if dry else gpu}), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines = [head, "", "| chain | stage | wall s | peak allocated GiB | peak reserved GiB | rlhf estimate GiB | "
             "tokens/s (train; PPO rollout / update) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['chain']} | {r['stage']} | {f(r['wall_s'], '.0f')} | failed: {r['error']} | | | |")
            continue
        tps = (f"{f(r.get('rollout_tokens_per_s'), '.0f')} / {f(r.get('update_tokens_per_s'), '.0f')}"
               if r["stage"] == "ppo" else f(r.get("train_tokens_per_s"), ".0f"))
        lines.append(f"| {r['chain']} | {r['stage']} | {f(r['wall_s'], '.0f')} | {f(r.get('peak_allocated_gib'))} | "
                     f"{f(r.get('peak_reserved_gib'))} | {f(r.get('estimate_peak_gib'))} | {tps} |")
    text = "\n".join(lines + [""] + notes) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"title": head, "stages": results, "notes": notes}, indent=1))
    print(text)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
