"""A stage killed with SIGKILL after a checkpoint resumes (--resume true) and ends where an uninterrupted run
with the same seed ends: same step count, final loss within 1e-3 relative. The tolerance only absorbs float
summation order; on CPU with the RNG state restored from the checkpoint the two runs replay the same batches."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.manifest import StageError, check_parent, read_manifest, work_dir
from helpers import write_jsonl as jsonl


def cli(stage, values: dict) -> list[str]:
    args = [sys.executable, "-m", "rlhf", stage]
    for k, v in values.items():
        args += [f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return args


def kill_after_checkpoint(stage, values, ckpt_step: int):
    """Start the stage, SIGKILL it once checkpoint-<ckpt_step> is complete, return the working folder."""
    work = work_dir(values["output_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cli(stage, values), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = work / "checkpoints" / f"checkpoint-{ckpt_step}" / "trainer_state.json"
    t0 = time.time()
    while not done.exists():
        assert proc.poll() is None, f"{stage} ended before its checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < 180, "no checkpoint within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Path(values["output_dir"]).exists() and work.exists()
    return work


def run_ok(stage, values):
    """Run a stage in this process (the killed run is the only subprocess: imports cost seconds)."""
    from rlhf.stages import STAGES
    from rlhf.config import load_config

    mod = STAGES[stage].load()
    mod.run(load_config(STAGES[stage].config_class(), None,
                        {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))


def last_loss(folder, key):
    rows = [json.loads(l) for l in (Path(folder) / "train_log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r][-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    rows = [{"instruction": f"What comes after {a}?", "output": str(a + 1)} for a in range(10, 90)]
    return jsonl(tmp / "sft.jsonl", rows)


def test_sft_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, data, tmp_path):
    base = dict(model_name_or_path=tiny_model_dir("llama"), dataset=[data], max_steps=16, save_steps=4, logging_steps=1,
                learning_rate=1e-2, lora_target="all-linear", max_length=48, task_eval_samples=0, seed=7)
    run_ok("sft", dict(base, output_dir=tmp_path / "straight"))
    out = tmp_path / "killed"
    kill_after_checkpoint("sft", dict(base, output_dir=out), ckpt_step=8)
    with pytest.raises(StageError, match="did not finish.*resume"):  # the next stage refuses the partial folder
        check_parent(out, "sft", for_stage="rlhf rm")
    run_ok("sft", dict(base, output_dir=out, resume=True))
    a, b = read_manifest(tmp_path / "straight"), read_manifest(out)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 16
    assert last_loss(out, "loss") == pytest.approx(last_loss(tmp_path / "straight", "loss"), rel=1e-3)
    assert b["metrics"]["train_loss_last"] == pytest.approx(a["metrics"]["train_loss_last"], rel=1e-3)


def test_ppo_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, data, tmp_path):
    from rlhf.config import load_config
    from rlhf.stages import rm, sft

    pairs = jsonl(tmp_path / "pref.jsonl", [{"instruction": f"What comes after {a}?", "chosen": str(a + 1),
                                             "rejected": str(a)} for a in range(10, 50)])
    common = dict(max_steps=4, max_length=48, lora_target="all-linear", learning_rate=1e-2)
    sft_dir = sft.run(load_config(sft.SFTConfig, None,
                                  dict(common, model_name_or_path=tiny_model_dir("llama"), dataset=[data],
                                                               output_dir=str(tmp_path / "sft"), task_eval_samples=0)))
    rm_dir = rm.run(load_config(rm.RMConfig, None,
                                dict(common, sft_dir=sft_dir, dataset=[pairs], output_dir=str(tmp_path / "rm"))))
    base = dict(sft_dir=sft_dir, rm_dir=rm_dir, dataset=[data], max_steps=6, save_steps=2, batch_size=4,
                mini_batch_size=4,
                per_device_train_batch_size=4, ppo_epochs=1, max_new_tokens=4, eval_samples=0, max_prompt_length=48,
                learning_rate=1e-3, seed=5, save_total_limit=2)
    run_ok("ppo", dict(base, output_dir=tmp_path / "straight"))
    out = tmp_path / "killed"
    kill_after_checkpoint("ppo", dict(base, output_dir=out), ckpt_step=4)
    run_ok("ppo", dict(base, output_dir=out, resume=True))
    a, b = read_manifest(tmp_path / "straight"), read_manifest(out)
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == 6
    for key in ("policy_loss", "value_loss", "score_mean"):
        assert last_loss(out, key) == pytest.approx(last_loss(tmp_path / "straight", key), rel=1e-3, abs=1e-6), key
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) <= 2  # rotation kept the last two
