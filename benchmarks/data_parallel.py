"""One process against two (accelerate launch, configs/accelerate/cpu.yaml) for sft, rm and ppo, at the same global
batch.

    OMP_NUM_THREADS=1 python benchmarks/data_parallel.py          # llama hidden 256 x 4 layers, ~10 min on 2 cores
    python benchmarks/data_parallel.py --hidden 64 --layers 2 --steps 4 --repeats 1    # a quick look

Variants, each a separate `rlhf <stage>` command: 1 process x 1 thread (the baseline), 1 process x 2 threads, and
2 processes x 1 thread under `accelerate launch` (data parallel over gloo, each process half the batch). sft and rm
train on the bundled demo data (global batch 16); ppo runs from the baseline's sft and rm folders (32 prompts a step,
8 new tokens). Reported, best of --repeats interleaved runs: the training time the stage itself logs (trainer
train_runtime; for ppo the sum of rollout and update times), the whole command's wall time (start-up and model
loading included), both as ratios to the baseline, and the last logged loss (the same global batch should give a
similar loss). On a machine with GPUs, the same comparison is 1 GPU against 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, ROOT, best_of, load_average, machine, make_base, md_table, write_json  # noqa: E402

CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
VARIANTS = {"1 proc x 1 thread": (1, 1), "1 proc x 2 threads": (1, 2), "2 procs x 1 thread": (2, 1)}


def stage_args(stage: str, procs: int, args, base: str, parents: dict) -> list[str]:
    """`rlhf <stage>` options: the global batch is split over the processes."""
    common = ["--max-steps", str(args.steps), "--logging-steps", "1", "--save-steps", "100000", "--seed", "42"]
    if stage == "ppo":
        return ["ppo", str(ROOT / "configs/demo/ppo.yaml"), "--sft-dir", parents["sft"], "--rm-dir", parents["rm"],
                "--batch-size", str(32 // procs), "--mini-batch-size", str(16 // procs),
                "--per-device-train-batch-size", str(16 // procs), "--eval-samples", "0", "--critic-warmup-steps", "0",
                "--sample-every", "0", *common]
    lora = ["--lora-r", "8", "--lora-alpha", "16", "--lora-target", "all-linear", "--learning-rate", "1e-3",
            "--per-device-train-batch-size", str(16 // procs), "--max-length", "64"]
    if stage == "sft":
        return ["sft", "--model-name-or-path", base, "--dataset", "demo_sft", "--task-eval-samples", "0", *lora,
                *common]
    return ["rm", "--sft-dir", parents["sft"], "--dataset", "demo_pref", *lora, *common]


def run(stage: str, variant: str, args, base: str, parents: dict, out: Path) -> dict:
    procs, threads = VARIANTS[variant]
    launcher = [sys.executable, "-m", "rlhf"] if procs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "--num_processes",
        str(procs), "-m", "rlhf"]
    cmd = launcher + stage_args(stage, procs, args, base, parents) + ["--output-dir", str(out),
                                                                      "--overwrite-output-dir", "true"]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    if stage == "ppo":
        steps = [r for r in rows if "time_rollout" in r]
        train_s, loss = sum(r["time_rollout"] + r["time_update"] for r in steps), steps[-1]["score_mean"]
        return {"train_s": train_s, "wall_s": wall, "last": loss, "rollout_s": sum(r["time_rollout"] for r in steps)}
    else:
        train_s = next(r["train_runtime"] for r in rows if "train_runtime" in r)
        loss = [r["loss"] for r in rows if "loss" in r][-1]
    return {"train_s": train_s, "wall_s": wall, "last": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stages", nargs="*", default=["sft", "rm", "ppo"])
    ap.add_argument("--variants", nargs="*", type=int, choices=range(len(VARIANTS)), default=list(range(len(VARIANTS))),
                    help="which variants, by position (0 is the baseline and always runs)")
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    args = ap.parse_args()

    load_before = load_average()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="data_parallel_") as tmp:
        base = make_base(Path(tmp) / "base", args.hidden, args.layers)
        parents: dict = {}
        order = ["sft", "rm", "ppo"]
        chosen = [v for i, v in enumerate(VARIANTS) if i == 0 or i in args.variants]
        for stage in order:
            if not any(s in args.stages for s in order[order.index(stage):]):
                break  # neither this stage nor a later one (which would need it as a parent) is asked for

            def one(variant: str, stage=stage) -> dict:
                r = run(stage, variant, args, base, parents, Path(tmp) / f"{stage}_{list(VARIANTS).index(variant)}")
                split = f" (rollout {r['rollout_s']:.1f} s)" if "rollout_s" in r else ""
                print(f"{stage:4s} {variant:20s} train {r['train_s']:6.1f} s{split}, command {r['wall_s']:6.1f} s, "
                      f"last {r['last']:.4f}", flush=True)
                return r

            if stage in args.stages:
                best = best_of(args.repeats, chosen, one, key=lambda r: r["train_s"])
                results.update({(stage, v): r for v, r in best.items()})
            else:  # only a parent for a later stage: the baseline once
                one(chosen[0])
            parents[stage] = str(Path(tmp) / f"{stage}_0")
    rows = []
    for stage in args.stages:
        b = results[(stage, "1 proc x 1 thread")]
        for variant in [v for v in VARIANTS if (stage, v) in results]:
            r = results[(stage, variant)]
            rows.append([stage, variant, f"{r['train_s']:.1f}", f"{b['train_s'] / r['train_s']:.2f}x",
                         f"{r['wall_s']:.1f}",
                         f"{b['wall_s'] / r['wall_s']:.2f}x", f"{r['last']:.4f}"])
    info = machine()
    title = (f"1 vs 2 processes (llama hidden {args.hidden} x {args.layers} layers, {args.steps} steps, global batch "
             "16 "
             f"(ppo: 32 prompts), best of {args.repeats}; {info['cpu']}, {info['cores']} cores; load {load_before} -> "
             f"{load_average()})")
    table = md_table(["stage", "variant", "train s", "train speed-up", "command s", "command speed-up",
                      "last loss (ppo: score)"], rows)
    print(f"\n{title}\n\n{table}")
    write_json(args.json, {"title": title, "table": table})


if __name__ == "__main__":
    main()
