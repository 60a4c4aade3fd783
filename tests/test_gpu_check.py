"""Two checks that must stay cheap: every stage command and the pipeline refuse a bad config key, value or dataset
name before torch loads, and benchmarks/gpu_check.sh runs end to end on a CPU with --dry-run (the demo chain at
4-bit, each stage's peak memory beside rlhf estimate's, tokens/s, the results file), so the script is ready for a
GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"
HEAVY = ("torch", "transformers", "trl", "peft", "datasets")


def pipeline_file(folder: Path, extra: dict) -> str:
    """A pipeline of every demo stage, ``extra[stage]`` added to that stage's inline keys; output_root folder/runs."""
    names = ("pt", "sft", "rm", "ppo", "dpo", "grpo")
    stages = "".join(f"  {s}: {{config: {DEMO}/{s}.yaml{extra.get(s, '')}}}\n" for s in names)
    (folder / "pipeline.yaml").write_text(f"output_root: {folder / 'runs'}\nstages:\n{stages}")
    return str(folder / "pipeline.yaml")


@pytest.mark.parametrize("args, needles", [
    (["rm", "--dataset", "demo_prefx", "--sft-dir", "runs/none"], ["unknown dataset 'demo_prefx'", "'demo_pref'"]),
    (["pt", "--dataset", "demo_corpsu"], ["unknown dataset 'demo_corpsu'", "'demo_corpus'"]),
    (["sft", "--dataset", "demo_sft", "--lora-rnak", "8"], ["unknown key 'lora_rnak'", "did you mean"]),
    (["ppo", "--dataset", "demo_promptx", "--sft-dir", "runs/none", "--rm-dir", "runs/none"],
     ["unknown dataset 'demo_promptx'", "'demo_prompts'"]),
    (["ppo", "--dataset", "demo_prompts", "--sft-dir", "runs/none", "--rm-dir", "runs/none", "--mini-batch-size", "3"],
     ["ppo: key 'mini_batch_size' (3) must divide batch_size"]),
    (["grpo", "--dataset", "demo_promptx", "--sft-dir", "runs/none", "--reward-funcs", "rlhf.rewards:demo_task"],
     ["unknown dataset 'demo_promptx'", "'demo_prompts'"]),
    (["grpo", "--dataset", "demo_prompts", "--sft-dir", "runs/none"], ["grpo: key 'reward_funcs' is empty", "rm_dir"]),
    (["dpo", "--dataset", "demo_prefx", "--sft-dir", "runs/none"], ["unknown dataset 'demo_prefx'", "'demo_pref'"]),
    (["pipeline", {"grpo": ", dataset: demo_promptx"}], ["(stages.grpo): unknown dataset 'demo_promptx'",
                                                          "'demo_prompts'"]),  # the last stage: all are checked
    (["pipeline", {"ppo": ", lora_rnak: 8"}], ["(stages.ppo): unknown key 'lora_rnak'", "did you mean"]),
], ids=["rm", "pt", "sft", "ppo", "ppo-value", "grpo", "grpo-reward", "dpo", "pipeline", "pipeline-key"])
def test_config_and_dataset_errors_come_before_torch_loads(args, needles, tmp_path):
    """One `Error:` line (what, where, what to do), and none of the heavy libraries imported: no model loads, and a
    pipeline starts no stage (its output_root stays empty) when any stage's config is wrong."""
    if args[0] == "pipeline":
        args = ["pipeline", pipeline_file(tmp_path, args[1])]
    code = ("import sys\nfrom rlhf.cli import cli\ntry:\n    cli(sys.argv[1:], prog_name='rlhf')\nfinally:\n"
            f"    print(sorted(m for m in {HEAVY} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode in (1, 2) and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert r.stdout.strip().endswith("[]"), r.stdout
    assert not (tmp_path / "runs").exists()


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "RLHF_CACHE": str(tmp_path / "no_cache")}  # no real model here: that chain is skipped
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--python",
                           sys.executable], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    stages = {r["stage"]: r for r in res["stages"]}
    assert [(r["chain"], r["stage"]) for r in res["stages"]] == [("demo", s) for s in ("pt", "sft", "rm", "ppo")]
    assert all(r["estimate_peak_gib"] > 0 for s, r in stages.items() if s != "pt")
    assert stages["sft"]["train_tokens_per_s"] > 0
    assert stages["ppo"]["rollout_tokens_per_s"] > 0 and stages["ppo"]["update_tokens_per_s"] > 0
    assert any("real-model chain skipped" in n for n in res["notes"])
    sft = json.loads((out / "demo" / "sft" / "manifest.json").read_text())["config"]
    assert sft["quantization"] == "4bit"
    assert "| demo | ppo |" in (out / "results.md").read_text()
    assert (out / "environment.txt").read_text().count("torch") >= 1
