"""The demo reward model's held-out pairwise accuracy over seeds: what a newcomer's `scripts/demo.sh` gets, with
its spread (seed spread stands in for another CPU's rounding; docs: tests/test_demo.py's threshold sits below the
worst seed).

    python benchmarks/demo_rm_seeds.py                               # seeds 42 0 1 2 3 (42 is the demo's own)
    python benchmarks/demo_rm_seeds.py --set learning_rate=5e-4 --tag lr5e-4   # another RM recipe, same SFT folders
    python benchmarks/demo_rm_seeds.py --fixed-sft                   # vary only the RM seed (SFT seed 42)
    python benchmarks/demo_rm_seeds.py --ppo                         # and PPO on each seed's SFT + RM

The demo base (configs/demo/pt.yaml, seed 42) is trained once; then for each seed SFT (configs/demo/sft.yaml)
and RM (configs/demo/rm.yaml plus any --set) run with that seed, as `rlhf pipeline configs/demo/pipeline.yaml`
would with `shared: {seed: S}`. Finished folders under --out are reused (delete them to rerun). About 80 s per
seed on 2 cores (SFT ~30 s, RM ~50 s), plus ~60 s for the base. Prints one line per seed and the summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, ROOT, machine  # noqa: E402,F401  (ENV: one thread, offline; set on import)

import yaml  # noqa: E402


def run_stage(stage: str, out: Path, **values) -> tuple[dict, float]:
    """Run ``stage`` from configs/demo/<stage>.yaml with ``values`` over it, unless ``out`` is finished;
    (manifest, s)."""
    from rlhf.config import load_config
    from rlhf.manifest import read_manifest
    from rlhf.stages import STAGES

    if (out / "manifest.json").is_file():
        return read_manifest(out), 0.0
    mod = STAGES[stage].load()
    cfg = load_config(STAGES[stage].config_class(), str(ROOT / "configs" / "demo" / f"{stage}.yaml"),
                      {**values, "output_dir": str(out), "overwrite_output_dir": True})
    t = time.time()
    mod.run(cfg)
    return read_manifest(out), time.time() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3])
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_rm_seeds"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="RM config value over configs/demo/rm.yaml")
    p.add_argument("--tag", default="demo", help="name of this RM recipe's folders (rm_<tag>_s<seed>)")
    p.add_argument("--fixed-sft", action="store_true", help="SFT with seed 42 for every RM seed")
    p.add_argument("--ppo", action="store_true",
                   help="also PPO (configs/demo/ppo.yaml) on each seed's SFT and RM (~60 s each)")
    a = p.parse_args(argv)
    from rlhf.logging_utils import setup_logging

    setup_logging()
    rm_values = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    out = Path(a.out)
    pt, _ = run_stage("pt", out / "pt")
    rows = []
    for seed in a.seeds:
        sft_seed = 42 if a.fixed_sft else seed
        sft, _ = run_stage("sft", out / f"sft_s{sft_seed}", model_name_or_path=str(out / "pt"), seed=sft_seed)
        rm, secs = run_stage("rm", out / f"rm_{a.tag}_s{seed}", sft_dir=str(out / f"sft_s{sft_seed}"), seed=seed,
                             **rm_values)
        row = {"seed": seed, "sft_seed": sft_seed, "sft_task_metric": sft["metrics"].get("task_metric_after"),
               "rm_eval_accuracy": rm["metrics"]["eval_accuracy"], "rm_s": round(secs, 1)}
        if a.ppo:
            ppo, secs = run_stage("ppo", out / f"ppo_{a.tag}_s{seed}", sft_dir=str(out / f"sft_s{sft_seed}"),
                                  rm_dir=str(out / f"rm_{a.tag}_s{seed}"), seed=seed)
            row.update({k: ppo["metrics"].get(k) for k in ("eval_reward_before", "eval_reward_after",
                                                           "eval_task_metric_before",
                                                             "eval_task_metric_after")}, ppo_s=round(secs, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    acc = [round(r["rm_eval_accuracy"], 4) for r in rows]
    summary = {"tag": a.tag, "set": rm_values, "fixed_sft": a.fixed_sft, "seeds": a.seeds, "accuracy": acc,
               "mean": round(statistics.mean(acc), 4), "min": min(acc), "max": max(acc),
               "stdev": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
               "sft_task_metric": [r["sft_task_metric"] for r in rows], "machine": machine()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
