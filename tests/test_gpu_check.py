"""Two checks that must stay cheap: a stage's config and dataset names are refused before torch loads (rm and pt as
well as sft), and benchmarks/gpu_check.sh runs end to end on a CPU with --dry-run (the demo chain at 4-bit, each
stage's peak memory beside rlhf estimate's, tokens/s, the results file), so the script is ready for a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_and_dataset_errors_come_before_torch_loads():
    code = ("import sys\nfrom rlhf.cli import cli\n"
            "for args in (['rm', '--dataset', 'demo_prefx', '--sft-dir', 'runs/none'],\n"
            "             ['pt', '--dataset', 'demo_corpsu'],\n"
            "             ['sft', '--dataset', 'demo_sft', '--lora-rnak', '8']):\n"
            "    try:\n        cli(args, standalone_mode=False)\n"
            "    except Exception as e:\n        print(type(e).__name__, e)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "unknown dataset 'demo_prefx'" in out and "did you mean 'demo_pref'" in out, out
    assert "unknown dataset 'demo_corpsu'" in out and "'demo_corpus'" in out, out
    assert "lora_rnak" in out and "lora_r" in out, out
    assert out.strip().endswith("[]"), out


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
