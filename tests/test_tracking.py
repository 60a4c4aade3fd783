"""report_to: tensorboard event files inside the stage folder (offline), read back equal to train_log.jsonl; and the
training-curve grid a person can read (PIL: the PNG's aspect, PPO's panels)."""
import math
from pathlib import Path

import pytest

from rlhf.train_utils import TRACKER_DIR, plot_curves, plot_panels, read_log
from helpers import write_jsonl
from test_ppo import cfg_for, make_parents
from test_sft import sft_cfg


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the event files directly in ``folder`` (tensorboard's reader, no TensorFlow)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_sft_logs_to_tensorboard_in_the_stage_folder(tiny_model_dir, tmp_path):
    from rlhf.stages import sft

    rows = [{"instruction": f"Say the number after {i}.", "input": "", "output": f"{i + 1}"} for i in range(10, 30)]
    data = write_jsonl(tmp_path / "count.jsonl", rows)
    out = Path(sft.run(sft_cfg(tiny_model_dir("llama"), tmp_path / "out", data, max_steps=4, logging_steps=2,
                               report_to="tensorboard")))
    logged = scalars(out / TRACKER_DIR)
    losses = {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}
    assert len(losses) >= 2
    # transformers' TensorBoardCallback names: train/loss for the JSONL's loss
    assert logged["train/loss"] == pytest.approx(losses, rel=1e-6)


def test_ppo_logs_the_jsonl_names_to_tensorboard(tiny_model_dir, tmp_path):
    from rlhf.stages import ppo

    parents = make_parents(tmp_path / "parents", tiny_model_dir("llama"))
    out = Path(ppo.run(cfg_for(parents, tmp_path / "ppo", max_steps=2, ppo_epochs=1, save_steps=10,
                               report_to="tensorboard")))
    logged = scalars(out / TRACKER_DIR / "ppo")
    rows = read_log(out)
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "eval_reward"):
        want = {r["step"]: r[key] for r in rows if key in r}
        assert want and logged[key] == pytest.approx(want, rel=1e-6), key
    assert "step" not in logged


def test_pt_logs_the_jsonl_names_to_tensorboard(tmp_path):
    from rlhf.datasets_registry import make_demo_data as mdd
    from test_pt import pretrain

    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join((mdd.DATA_DIR / "demo_corpus.jsonl").read_text().splitlines()[:200]) + "\n")
    out = pretrain(tmp_path, str(data), report_to="tensorboard", max_steps=10)
    logged = scalars(out / TRACKER_DIR / "pt")
    want = {r["step"]: r["loss"] for r in read_log(out)}
    assert len(want) >= 2 and logged["loss"] == pytest.approx(want, rel=1e-6)


def test_report_to_none_writes_no_event_files_and_is_the_default(tmp_path):
    from rlhf.config import ConfigError, TrainConfig
    from rlhf.train_utils import open_trackers, trackers

    assert trackers(TrainConfig()) == []
    assert trackers(TrainConfig(report_to=["tensorboard", "wandb"])) == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="report_to.*no_such_tracker"):
        open_trackers(TrainConfig(report_to=["no_such_tracker"]), tmp_path, "pt", {})
    assert open_trackers(TrainConfig(), tmp_path, "pt", {}) == [] and not list(tmp_path.iterdir())


def ppo_rows(n=12):
    keys = ["score_mean", "kl", "task_metric", "eos_share", "response_length", "policy_loss", "value_loss",
            "policy_clipfrac", "value_clipfrac", "approx_kl", "entropy", "lr"]
    rows = [{"step": s, **{k: math.sin(s + i) for i, k in enumerate(keys)}} for s in range(1, n + 1)]
    return [{"step": 0, "eval_reward": 0.1}] + rows + [{"step": n, "eval_reward": 0.4}]


def test_ppo_plot_is_a_readable_grid(tmp_path):
    from PIL import Image

    from rlhf.stages import ppo

    rows = ppo_rows()
    png = tmp_path / "curves.png"
    ppo.plot(rows, png)
    w, h = Image.open(png).size
    assert w / h <= 2 and w <= 1700, (w, h)
    panels = plot_panels(rows, ppo.PLOT_KEYS)
    assert {"policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "entropy", "score_mean",
            "eval_reward"} <= set(panels)
    assert "eval_task_metric" not in panels  # absent from the log: no empty panel


def test_one_panel_plot_stays_small(tmp_path):
    png = tmp_path / "one.png"
    plot_curves([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], ["loss", "eval_loss"], png, "sft")
    from PIL import Image

    w, h = Image.open(png).size
    assert w <= 600 and h <= 500, (w, h)
