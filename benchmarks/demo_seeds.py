"""The demo pipeline over seeds: what a newcomer's `scripts/demo.sh` gets at each stage, with its spread (seed spread
stands in for another CPU's rounding; tests/test_demo.py's thresholds sit below the worst seed with margin).

    python benchmarks/demo_seeds.py                                  # seeds 42 0 1 (42 is the demo's own)
    python benchmarks/demo_seeds.py --seeds 42 0 1 2 3 --set ppo.learning_rate=1e-3 --set rm.max_steps=600
    python benchmarks/demo_seeds.py --samples 6                      # and 6 held-out replies before/after PPO

The demo base (configs/demo/pt.yaml, seed 42) is trained once; then for each seed sft, rm and ppo run from
configs/demo/<stage>.yaml with that seed (and any --set STAGE.KEY=VALUE), as `rlhf pipeline
configs/demo/pipeline.yaml` would with `shared: {seed: S}`. A stage's folder under --out is named by its seed and a
hash of its settings, its parents' and the demo data's; a finished one is reused (delete --out to rerun). Prints
one JSON line per seed: SFT's greedy task and preference metrics before/after (held-out demo_sft_eval), the RM's
held-out pairwise accuracy, PPO's held-out metrics before/after (greedy and sampled at its temperature), its last
KL and EOS share, and each stage's wall and CPU seconds (of this process; other jobs on the cores stretch the
wall time, not the CPU time); then a summary (mean, min, max per figure).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, ROOT, machine  # noqa: E402,F401  (ENV: one thread, offline; set on import)

import yaml  # noqa: E402

DATA = ROOT / "datasets_registry" / "data"
PPO_KEYS = [f"eval_{k}{mode}_{when}" for k in ("pref_metric", "task_metric", "reward") for mode in ("_greedy", "")
            for when in ("before", "after")] + ["eval_eos_share_greedy_after", "eval_eos_share_after", "kl_last",
                                                "eos_share_last"]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_stage(stage: str, out: Path, values: dict, parents: list[Path]) -> tuple[Path, dict, dict]:
    """Run ``stage`` from configs/demo/<stage>.yaml with ``values`` over it into a folder under ``out`` named by the
    settings (reused when finished): (folder, manifest, {"wall_s", "cpu_s"})."""
    from rlhf.config import load_config
    from rlhf.manifest import read_manifest
    from rlhf.stages import STAGES

    files = [DATA / "demo_corpus.jsonl"] if stage == "pt" else sorted(DATA.glob("demo_*.jsonl"))
    data = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    key = json.dumps([values, [p.name for p in parents], data], sort_keys=True)
    folder = out / f"{stage}_s{values.get('seed', 42)}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if (folder / "manifest.json").is_file():
        return folder, read_manifest(folder), {}
    cfg = load_config(STAGES[stage].config_class(), str(ROOT / "configs" / "demo" / f"{stage}.yaml"),
                      {**values, "output_dir": str(folder), "overwrite_output_dir": True})
    wall, cpu = time.time(), cpu_s()
    STAGES[stage].load().run(cfg)
    return folder, read_manifest(folder), {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_s() - cpu, 1)}


def parse_sets(items: list[str], stages: tuple[str, ...]) -> dict[str, dict]:
    """--set STAGE.KEY=VALUE items -> {stage: {key: value}} (values read as YAML)."""
    sets: dict[str, dict] = {s: {} for s in stages}
    for item in items:
        key, _, value = item.partition("=")
        stage, _, key = key.partition(".")
        if stage not in sets or not key or not value:
            sys.exit(f"--set {item}: give STAGE.KEY=VALUE with STAGE one of {', '.join(stages)}")
        sets[stage][key] = yaml.safe_load(value)
    return sets


def replies(folder: Path, n: int) -> list[str]:
    """Greedy replies of a policy folder to the first ``n`` held-out prompts (demo_prompts_eval)."""
    from rlhf.data import load_examples
    from rlhf.evaluate import encode_prompts, generate_all
    from rlhf.stage_folder import POLICIES, load_stage, open_stage

    model, tok = load_stage(open_stage(str(folder), POLICIES, "demo_seeds"))
    rows = load_examples(["demo_prompts_eval"], kind="prompt", num_samples=n)
    ids, _ = encode_prompts(tok, rows, 64, "demo_prompts_eval")
    got = generate_all(model, tok, ids, batch_size=n, max_new_tokens=12, sampling={"do_sample": False},
                       progress=False)
    return [f"{r['messages'][-1]['content']} -> {g!r}" for r, g in zip(rows, got)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_seeds"))
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a config value over configs/demo/<stage>.yaml, e.g. ppo.temperature=1.0")
    p.add_argument("--samples", type=int, default=0, help="print this many held-out greedy replies before/after PPO")
    a = p.parse_args(argv)
    from rlhf.logging_utils import setup_logging

    setup_logging()
    sets = parse_sets(a.set, ("pt", "sft", "rm", "ppo"))
    out = Path(a.out)
    pt, _, pt_time = run_stage("pt", out, {"seed": 42, **sets["pt"]}, [])
    rows = []
    for seed in a.seeds:
        sft, sft_m, sft_time = run_stage("sft", out, {"model_name_or_path": str(pt), **sets["sft"], "seed": seed},
                                         [pt])
        rm, rm_m, rm_time = run_stage("rm", out, {"sft_dir": str(sft), **sets["rm"], "seed": seed}, [sft])
        ppo, ppo_m, ppo_time = run_stage("ppo", out, {"sft_dir": str(sft), "rm_dir": str(rm), **sets["ppo"],
                                                      "seed": seed}, [sft, rm])
        s, r, m = sft_m["metrics"], rm_m["metrics"], ppo_m["metrics"]
        row = {"seed": seed, **{f"sft_{k}": s.get(k) for k in ("task_metric_before", "task_metric_after",
                                                                "pref_metric_before", "pref_metric_after")},
               "rm_eval_accuracy": r.get("eval_accuracy"), **{f"ppo_{k}": m.get(k) for k in PPO_KEYS},
               "time": {"pt": pt_time, "sft": sft_time, "rm": rm_time, "ppo": ppo_time},
               "folders": [str(f) for f in (sft, rm, ppo)]}
        if a.samples:
            row["replies"] = {"sft": replies(sft, a.samples), "ppo": replies(ppo, a.samples)}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = {"seeds": a.seeds, "set": sets, "machine": machine()}
    for k in [k for k, v in rows[0].items() if isinstance(v, float)]:
        vals = [r[k] for r in rows if isinstance(r[k], float)]
        summary[k] = {"mean": round(statistics.mean(vals), 4), "min": round(min(vals), 4),
                      "max": round(max(vals), 4)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
