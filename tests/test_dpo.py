"""DPO stage: the reference is the frozen SFT adapter on the same base (the first loss is log 2), every loss type
(sigmoid, ipo through DPOTrainer; simpo, orpo reference-free through trl's CPO/ORPO trainers), a policy folder of
the stage contract that the use commands open and grpo starts from, and bad inputs. Tiny llama; the SFT parent has
random (non-zero) LoRA weights, so the SFT adapter and the bare base differ."""
import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_model_dir):
    from test_ppo import make_parents

    return make_parents(tmp_path_factory.mktemp("dpo_parents"), tiny_model_dir("llama"))


def dpo_values(parents, out, **kw) -> dict:
    values = dict(sft_dir=parents["sft"], output_dir=str(out), dataset="demo_pref", eval_dataset="demo_pref_eval",
                  num_samples=16, max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  eval_samples=4, max_new_tokens=6, save_steps=2, learning_rate=1e-3, max_length=64, logging_steps=1,
                  seed=3)
    values.update(kw)
    return values


def run_dpo(values: dict) -> str:
    from rlhf.config import load_config
    from rlhf.stages import dpo

    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    return dpo.run(load_config(dpo.DPOConfig, None, values))


def log_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(parents, tmp_path_factory):
    return run_dpo(dpo_values(parents, tmp_path_factory.mktemp("dpo") / "dpo"))


def test_dpo_reference_is_the_sft_adapter_and_the_folder_is_a_policy(parents, dpo_run):
    from safetensors.torch import load_file

    from rlhf.manifest import read_manifest
    from rlhf.stage_folder import POLICIES, load_stage, open_stage

    rows = log_rows(dpo_run)
    first = next(r for r in rows if "loss" in r)
    # policy == reference at step 0: every implicit reward is 0 and the sigmoid loss is log 2. (The bare base as the
    # reference would give another loss: the SFT parent's LoRA weights are random, not zero.)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] == pytest.approx(0)
    assert any(r.get("rewards/accuracies", 0) > 0 for r in rows)  # reward accuracy and margins are logged
    m = read_manifest(dpo_run)
    assert m["stage"] == "dpo" and m["parent"]["stage"] == "sft" and m["config"]["loss_type"] == "sigmoid"
    assert {"eval_rewards_accuracies", "eval_rewards_margins", "task_metric_before", "task_metric_after"} <= set(
        m["metrics"])
    folder = Path(dpo_run)
    assert (folder / "training_curves.png").stat().st_size > 0 and (folder / "checkpoints" / "checkpoint-4").is_dir()
    assert not (folder / "ref").exists()  # only the trained adapter is saved, not trl's copy of the reference
    saved = load_file(str(folder / "adapter_model.safetensors"))
    sft = load_file(str(Path(parents["sft"]) / "adapter_model.safetensors"))
    assert saved.keys() == sft.keys() and any((saved[k] != sft[k]).any() for k in saved)  # trained, same shape
    model, tok = load_stage(open_stage(dpo_run, POLICIES, "rlhf chat"))
    assert model.active_adapter == "default" and tok.chat_template


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo", "sigmoid+sft"])
def test_dpo_loss_types_train(parents, tmp_path, loss_type):
    kw = dict(loss_type="sigmoid", sft_weight=1.0) if loss_type == "sigmoid+sft" else dict(loss_type=loss_type)
    out = run_dpo(dpo_values(parents, tmp_path / loss_type, max_steps=2, eval_samples=0, save_steps=10, **kw))
    rows = [r for r in log_rows(out) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if loss_type == "ipo":  # (h - 1 / (2 beta))^2 with h = 0 at the start: 1 / (4 beta^2) = 25
        assert rows[0]["loss"] == pytest.approx(25.0, rel=1e-3)
    if loss_type == "sigmoid+sft":  # RPO: log 2 + the chosen replies' mean token NLL (random SFT: about log V)
        assert rows[0]["loss"] > math.log(2) + 1.0


def test_grpo_starts_from_a_dpo_folder(parents, dpo_run, tmp_path):
    from rlhf.config import load_config
    from rlhf.manifest import read_manifest
    from rlhf.stages import grpo

    out = grpo.run(load_config(grpo.GRPOConfig, None, dict(
        sft_dir=dpo_run, reward_funcs=["rlhf.rewards:demo_task"], dataset="demo_prompts", num_samples=8, batch_size=2,
        num_generations=2, max_steps=1, max_new_tokens=4, eval_samples=0, output_dir=str(tmp_path / "g"))))
    assert read_manifest(out)["parent"]["stage"] == "dpo"


def test_ppo_starts_from_a_dpo_folder(parents, dpo_run, tmp_path):
    from test_ppo import cfg_for

    from rlhf.manifest import read_manifest
    from rlhf.stages import ppo

    out = ppo.run(cfg_for(parents, tmp_path / "p", sft_dir=dpo_run, max_steps=1, eval_samples=0, save_steps=10))
    m = read_manifest(out)
    assert m["parent"]["stage"] == "dpo" and m["metrics"]["steps"] == 1


def test_dpo_bad_inputs(parents, tmp_path):
    from rlhf.config import ConfigError, load_config
    from rlhf.data import DataError
    from rlhf.manifest import StageError, work_dir
    from rlhf.stages.dpo import DPOConfig

    with pytest.raises(ConfigError, match="must be one of"):
        load_config(DPOConfig, None, dpo_values(parents, tmp_path / "x", loss_type="kto"))
    with pytest.raises(ConfigError, match="set sft_dir"):
        load_config(DPOConfig, None, dpo_values(parents, tmp_path / "x", sft_dir=""))
    with pytest.raises(StageError, match="is the output of `rlhf rm`, but rlhf dpo needs a sft folder"):
        run_dpo(dpo_values(parents, tmp_path / "bad", sft_dir=parents["rm"]))
    with pytest.raises(DataError, match="prompt"):  # prompts only: no pairs
        run_dpo(dpo_values(parents, tmp_path / "bad", dataset="demo_prompts", eval_dataset=""))
    assert not work_dir(tmp_path / "bad").exists()


def test_pipeline_runs_dpo_then_grpo_and_skips_them_when_done(parents, tmp_path):
    """dpo and grpo are pipeline stages: grpo with a Python reward only (`rm_dir: ""` stays empty beside an rm)."""
    import yaml

    from rlhf.cli.pipeline import lineage, run_pipeline

    common = dict(sft_dir=parents["sft"], max_steps=2, eval_samples=0, seed=3)
    spec = {"output_root": str(tmp_path / "runs"), "stages": {
        "dpo": dict(common, dataset=["demo_pref"], num_samples=16, per_device_train_batch_size=4, max_length=64),
        "grpo": dict(common, rm_dir="", reward_funcs=["rlhf.rewards:demo_task"], dataset=["demo_prompts"],
                     num_samples=8, batch_size=2, num_generations=2, max_new_tokens=4)}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_pipeline(str(path)) == [("dpo", "ran"), ("grpo", "ran")]
    assert run_pipeline(str(path)) == [("dpo", "skipped"), ("grpo", "skipped")]
    assert [m["stage"] for m in lineage(str(tmp_path / "runs" / "grpo"))] == ["grpo", "sft"]
