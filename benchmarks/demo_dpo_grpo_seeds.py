"""DPO and GRPO on the demo over seeds: does each raise the held-out greedy preference metric over its SFT policy
without lowering the task metric?

    python benchmarks/demo_dpo_grpo_seeds.py                          # seeds 42 0 1, into runs/demo_seeds
    python benchmarks/demo_dpo_grpo_seeds.py --seeds 42 --set dpo.learning_rate=2e-4
    python benchmarks/demo_dpo_grpo_seeds.py --stages dpo --set dpo.beta=0.3   # dpo alone (no rm, no grpo)

Per seed, as benchmarks/demo_seeds.py runs the demo (its run_stage: configs/demo/<stage>.yaml with the seed, a
folder per settings, finished ones reused): the demo base (pt, seed 42) and sft, then (``--stages``, default all)
  dpo         configs/demo/dpo.yaml from that SFT folder;
  grpo_py     configs/demo/grpo.yaml: the Python reward rlhf.rewards:demo_pref (the demo task's checker);
  grpo_rm     the same with the RM folder (rm, configs/demo/rm.yaml) as the only reward (rm_dir, reward_funcs []).
Prints one JSON line per seed: each stage's held-out greedy task_metric (right in either layout) and pref_metric
(right, number alone) before/after (dpo: demo_pref_eval's prompts; grpo: demo_prompts_eval's) and whether
pref rose and task did not fall; then a summary (mean, min, max).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # noqa: E402  (one thread, offline; set on import)
from demo_seeds import parse_sets, run_stage  # noqa: E402


STAGES = ("dpo", "grpo_py", "grpo_rm")


def before_after(m: dict, prefix: str, suffix: str) -> dict:
    """{task,pref}_{before,after} out of a manifest's metrics, named ``<prefix>{task,pref}_metric<suffix>_<when>``."""
    return {f"{k}_{when}": m["metrics"].get(f"{prefix}{k}_metric{suffix}_{when}") for k in ("task", "pref")
            for when in ("before", "after")}


def judged(row: dict) -> dict:
    ok = row["pref_after"] > row["pref_before"] and row["task_after"] >= row["task_before"]
    return {**row, "pref_gain": row["pref_after"] - row["pref_before"],
            "task_change": row["task_after"] - row["task_before"], "ok": ok}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_seeds"))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="which to run (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a config value over configs/demo/<stage>.yaml (stage: pt sft rm dpo grpo)")
    a = p.parse_args(argv)
    from rlhf.logging_utils import setup_logging

    setup_logging()
    sets = parse_sets(a.set, ("pt", "sft", "rm", "dpo", "grpo"))
    out = Path(a.out)
    pt, _, _ = run_stage("pt", out, {"seed": 42, **sets["pt"]}, [])
    rows = []
    for seed in a.seeds:
        sft, _, _ = run_stage("sft", out, {"model_name_or_path": str(pt), **sets["sft"], "seed": seed}, [pt])
        row, times, folders = {"seed": seed}, {}, [sft]
        if "dpo" in a.stages:
            dpo, m, times["dpo"] = run_stage("dpo", out, {"sft_dir": str(sft), **sets["dpo"], "seed": seed}, [sft])
            row["dpo"], folders = judged(before_after(m, "", "")), folders + [dpo]
        grpo = {"sft_dir": str(sft), **sets["grpo"], "seed": seed}
        if "grpo_py" in a.stages:
            gpy, m, times["grpo_py"] = run_stage("grpo", out, grpo, [sft])
            row["grpo_py"], folders = judged(before_after(m, "eval_", "_greedy")), folders + [gpy]
        if "grpo_rm" in a.stages:
            rm, _, _ = run_stage("rm", out, {"sft_dir": str(sft), **sets["rm"], "seed": seed}, [sft])
            grm, m, times["grpo_rm"] = run_stage("grpo", out, {**grpo, "rm_dir": str(rm), "reward_funcs": []},
                                                 [sft, rm])
            row["grpo_rm"], folders = judged(before_after(m, "eval_", "_greedy")), folders + [rm, grm]
        row.update(time=times, folders=[str(f) for f in folders])
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"seeds": a.seeds, "set": sets, "machine": machine()}
    for stage in a.stages:
        summary[stage] = {"ok": sum(r[stage]["ok"] for r in rows)}
        for k in ("pref_before", "pref_after", "pref_gain", "task_before", "task_after", "task_change"):
            vals = [r[stage][k] for r in rows]
            summary[stage][k] = {"mean": round(statistics.mean(vals), 4), "min": round(min(vals), 4),
                                 "max": round(max(vals), 4)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
