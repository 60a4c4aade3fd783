"""The embedded default, end to end: the demo pipeline (pt -> sft -> rm -> ppo) on the bundled data shows
each stage's gain on the checkable demo task (rlhf/demo_task.py): SFT teaches the task with the preferred answer
layout on about half the prompts, the RM learns the preference, and PPO moves the greedy policy to it without
losing correctness. This is the slow module of the suite (the whole demo). The thresholds sit below the worst of
the seeds in benchmarks/demo_seeds.py with margin: another CPU's rounding moves results as a seed does."""
import json
from pathlib import Path

import pytest

from rlhf.cli.pipeline import run_pipeline
from rlhf.manifest import read_manifest
from rlhf.train_utils import read_log

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_pipeline(str(ROOT / "configs/demo/pipeline.yaml"), output_root=str(out))
    assert [s for s, _ in report] == ["pt", "sft", "rm", "ppo"]
    return {s: read_manifest(out / s) for s in ("pt", "sft", "rm", "ppo")} | {"root": out}


def test_pretraining_loss_falls(demo):
    m = demo["pt"]["metrics"]
    assert m["train_loss_last"] < 0.5 * m["train_loss_first"]


def test_sft_learns_the_task_but_the_preferred_layout_only_part_of_the_time(demo):
    m = demo["sft"]["metrics"]
    assert m["train_loss_last"] < 0.7 * m["train_loss_first"]
    assert m["task_metric_after"] >= m["task_metric_before"] + 0.5, m  # 0 -> 0.93 in seeds 42, 0, 1
    # greedy, the number alone on the "after" questions only: 0.435 in each seed; PPO has the rest to move
    assert 0.2 <= m["pref_metric_after"] <= m["task_metric_after"] - 0.3, m


def test_rm_accuracy(demo):
    # 0.88-0.905 over seeds 42, 0, 1 (benchmarks/demo_seeds.py); the bar sits below the worst seed with margin
    assert demo["rm"]["metrics"]["eval_accuracy"] >= 0.8, demo["rm"]["metrics"]


def test_ppo_moves_the_greedy_policy_to_the_preference_and_keeps_the_task(demo):
    m = demo["ppo"]["metrics"]
    print(json.dumps(m, indent=1))
    # greedy preference metric 0.365 -> 0.905 and task metric 0.905 -> 0.905 in each of seeds 42, 0, 1; KL ~0.95
    assert m["eval_pref_metric_greedy_before"] <= 0.6, m
    assert m["eval_pref_metric_greedy_after"] >= m["eval_pref_metric_greedy_before"] + 0.3, m
    assert m["eval_pref_metric_greedy_after"] >= 0.8, m
    assert m["eval_task_metric_greedy_after"] >= m["eval_task_metric_greedy_before"] - 0.05, m
    assert m["eval_reward_after"] > m["eval_reward_before"], m
    # no reward hacking: replies still end, the policy stays near the SFT model
    assert m["eval_eos_share_greedy_after"] >= 0.95 and m["eos_share_last"] >= 0.95, m
    assert m["kl_last"] < 5.0, m


def test_ppo_logs_the_reward_hacking_alarms_every_step(demo):
    rows = [r for r in read_log(demo["root"] / "ppo") if "score_mean" in r]
    assert len(rows) == demo["ppo"]["metrics"]["steps"]
    for key in ("kl", "eos_share", "task_metric", "pref_metric"):  # on the rollouts, beside the score
        assert all(key in r for r in rows), key
