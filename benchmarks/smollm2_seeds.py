"""The real-model chain (configs/smollm2-135m/: SmolLM2-135M-Instruct, sft -> rm -> ppo on two-digit addition)
over seeds: the held-out figures of each stage with their spread, and the time each stage takes.

    python scripts/fetch_smollm2.py                  # once
    python benchmarks/smollm2_seeds.py               # seeds 42 0 1; folders under runs/smollm2_seeds/s<seed>/
    python benchmarks/smollm2_seeds.py --seeds 42 --set ppo.max_steps=20   # a variant (keys over the YAMLs)

Each stage runs as `rlhf <stage> configs/smollm2-135m/<stage>.yaml --seed S ...` in its own process (one
thread), so its CPU time is that process's; finished folders are reused (delete them to rerun). Figures, all on
held-out prompts and pairs, none judged by the reward model except the reward itself (rlhf/arith_task.py):
- task: share of greedy answers with the right sum (any layout); pref: the exact equation "a + b = c";
  base / sft = the SFT manifest's *_before / *_after (64 prompts of arith_sft_eval), ppo = PPO's greedy eval after
  (32 prompts of arith_prompts_eval, held-out sums too); ppo_greedy_before is the SFT policy on those 32;
- rm_acc: the RM's pairwise accuracy on arith_pref_eval;
- reward / score / kl / eos: PPO's held-out greedy reward before -> after, its training score (sampled) at the
  first and last step, the KL of the last step, the held-out greedy eos share after.
Then a few held-out answers of the base, the SFT and the PPO model (greedy, loaded with plain transformers +
peft) for the first seed. Prints a line per seed, the summary as JSON, and the samples.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, ROOT, load_average, machine  # noqa: E402,F401  (ENV: one thread, offline; set on import)

CONFIGS = ROOT / "configs" / "smollm2-135m"
SAMPLE_PROMPTS = 6


def run_stage(stage: str, out: Path, args: list[str]) -> dict:
    """Run the stage in a child process unless ``out`` is finished; its manifest plus cpu_s / wall_s."""
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "rlhf", stage, str(CONFIGS / f"{stage}.yaml"), "--output-dir", str(out),
               "--overwrite-output-dir", "true", *args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.time()
        with open(out.parent / f"{stage}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        (out / "bench_time.json").write_text(json.dumps({"cpu_s": round(cpu, 1), "wall_s": round(time.time() - t, 1),
                                                         "load_average": load_average()}))
    m = json.loads((out / "manifest.json").read_text())
    return {**m["metrics"], **json.loads((out / "bench_time.json").read_text())}


def seed_row(seed: int, out: Path, extra: dict[str, list[str]]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    s = ["--seed", str(seed)]
    sft = run_stage("sft", out / "sft", s + extra.get("sft", []))
    rm = run_stage("rm", out / "rm", s + ["--sft-dir", str(out / "sft")] + extra.get("rm", []))
    ppo = run_stage("ppo", out / "ppo", s + ["--sft-dir", str(out / "sft"), "--rm-dir", str(out / "rm")]
                    + extra.get("ppo", []))
    g = "_greedy"
    return {
        "seed": seed,
        "task": [sft.get("task_metric_before"), sft.get("task_metric_after"), ppo.get(f"eval_task_metric{g}_after")],
        "pref": [sft.get("pref_metric_before"), sft.get("pref_metric_after"), ppo.get(f"eval_pref_metric{g}_after")],
        "ppo_greedy_before": [ppo.get(f"eval_task_metric{g}_before"), ppo.get(f"eval_pref_metric{g}_before")],
        "rm_acc": rm.get("eval_accuracy"),
        "reward": [ppo.get(f"eval_reward{g}_before"), ppo.get(f"eval_reward{g}_after")],
        "score": [ppo.get("score_first"), ppo.get("score_last")], "kl": ppo.get("kl_last"),
        "eos": ppo.get(f"eval_eos_share{g}_after"),
        "cpu_s": {k: v["cpu_s"] for k, v in (("sft", sft), ("rm", rm), ("ppo", ppo))},
        "wall_s": {k: v["wall_s"] for k, v in (("sft", sft), ("rm", rm), ("ppo", ppo))},
    }


def spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} +- {sd:.3f} ({min(vals):.3f}..{max(vals):.3f})"


def samples(base: str, out: Path, n: int) -> list[dict]:
    """Greedy answers to the first ``n`` held-out prompts: base, SFT and PPO folders, loaded the plain way."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "sft"))
    tok.padding_side = "left"
    rows = [json.loads(line) for line in (ROOT / "datasets_registry/data/arith_prompts_eval.jsonl").open()][:n]
    enc = tok.apply_chat_template([[{"role": "user", "content": r["instruction"]}] for r in rows],
                                  add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    table = [{"prompt": r["instruction"]} for r in rows]
    for name in ("base", "sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if name != "base":
            model = PeftModel.from_pretrained(model, str(out / name))
        with torch.no_grad():
            ids = model.eval().generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        for t, o in zip(table, ids):
            t[name] = tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2_seeds"))
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a config value over configs/smollm2-135m/<stage>.yaml, e.g. ppo.learning_rate=1e-4")
    p.add_argument("--no-samples", action="store_true", help="skip the sample answers")
    a = p.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for s in a.set:
        key, value = s.split("=", 1)
        stage, key = key.split(".", 1)
        extra.setdefault(stage, []).extend([f"--{key.replace('_', '-')}", value])
    rows = []
    for seed in a.seeds:
        rows.append(seed_row(seed, Path(a.out) / f"s{seed}", extra))
        print(json.dumps(rows[-1]), flush=True)
    col = {k: [r[k] for r in rows] for k in rows[0]}
    summary = {
        "seeds": a.seeds, "set": a.set,
        **{f"task_{s}": spread([t[i] for t in col["task"]]) for i, s in enumerate(("base", "sft", "ppo"))},
        **{f"pref_{s}": spread([t[i] for t in col["pref"]]) for i, s in enumerate(("base", "sft", "ppo"))},
        "task_sft_on_ppo_prompts": spread([r[0] for r in col["ppo_greedy_before"]]),
        "pref_sft_on_ppo_prompts": spread([r[1] for r in col["ppo_greedy_before"]]),
        "rm_acc": spread(col["rm_acc"]),
        "reward_before": spread([r[0] for r in col["reward"]]), "reward_after": spread([r[1] for r in col["reward"]]),
        "train_score_first": spread([r[0] for r in col["score"]]),
        "train_score_last": spread([r[1] for r in col["score"]]), "kl_last_step": spread(col["kl"]),
        "eos_after": spread(col["eos"]),
        **{f"cpu_s_{s}": spread([c[s] for c in col["cpu_s"]]) for s in ("sft", "rm", "ppo")},
        **{f"wall_s_{s}": spread([c[s] for c in col["wall_s"]]) for s in ("sft", "rm", "ppo")},
        "machine": machine(),
    }
    print(json.dumps(summary, indent=1), flush=True)
    if not a.no_samples:
        first = Path(a.out) / f"s{a.seeds[0]}"
        base = json.loads((first / "sft" / "manifest.json").read_text())["base_model"]["path"]
        for row in samples(base, first, SAMPLE_PROMPTS):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
