"""Faults at the wrong moment (issue 12, items 4, 5, 7a): torn or damaged checkpoints, a kill in the final save,
a second process on the same folder, a kill while a finished folder is replaced, a failed start, a diverging run,
a planted pickle in a PPO checkpoint. Kills are simulated by writing what a killed run leaves (a finished run's
folder turned back into its working folder, checkpoints torn by hand); tests/test_resume.py kills for real."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.manifest import (StageError, checkpoint_problem, finish_output, last_checkpoint, prepare_output,
                           read_manifest, unlock_output, work_dir)
from rlhf.stages import ppo, pt, rm, sft
from rlhf.train_utils import DivergedError, resume_point
from helpers import write_jsonl

SFT = dict(max_steps=8, save_steps=4, logging_steps=1, learning_rate=1e-2, lora_target="all-linear", max_length=48,
           task_eval_samples=0, seed=7)


def run(stage, **values):
    mod = {"sft": sft, "rm": rm, "ppo": ppo}[stage]
    cls = {"sft": sft.SFTConfig, "rm": rm.RMConfig, "ppo": ppo.PPOConfig}[stage]
    return mod.run(load_config(cls, None, {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))


def killed_copy(finished: Path, out: Path) -> Path:
    """What a run killed after its last checkpoint leaves: the working folder, no manifest."""
    work = work_dir(out)
    shutil.copytree(finished, work)
    (work / "manifest.json").unlink()
    return work


def log_rows(folder, key="loss"):
    return [r for r in (json.loads(l) for l in (Path(folder) / "train_log.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Finished sft and rm runs of 8 steps with checkpoints at 4 and 8, and their configs."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_jsonl(tmp / "sft.jsonl",
                       [{"instruction": f"What comes after {a}?", "output": str(a + 1)} for a in range(10, 90)])
    pairs = write_jsonl(tmp / "pref.jsonl",
                        [{"instruction": f"What comes after {a}?", "chosen": str(a + 1), "rejected": str(a)}
                                             for a in range(10, 60)])
    cfgs = {"sft": dict(SFT, model_name_or_path=tiny_model_dir("llama"), dataset=[data])}
    done = {"sft": Path(run("sft", **cfgs["sft"], output_dir=tmp / "sft"))}
    cfgs["rm"] = dict(SFT, sft_dir=str(done["sft"]), dataset=[pairs])
    del cfgs["rm"]["task_eval_samples"]
    done["rm"] = Path(run("rm", **cfgs["rm"], output_dir=tmp / "rm"))
    return cfgs, done, data


# --- one definition of a complete checkpoint


def write_checkpoint(ckpt: Path, step: int):
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path, caplog):
    """Torn (empty, README only, adapter without trainer_state, PPO's .tmp) and damaged (trainer_state.json,
    optimizer.pt, adapter) checkpoints are skipped with a log line and removed; the log is cut after the one kept."""
    ckpts = tmp_path / "checkpoints"
    write_checkpoint(ckpts / "checkpoint-2", 2)
    (ckpts / "checkpoint-4").mkdir()
    (ckpts / "checkpoint-6").mkdir()
    (ckpts / "checkpoint-6" / "README.md").write_text("torn")
    for step, damage in [(8, "trainer_state.json"), (10, "optimizer.pt"), (12, "adapter_model.safetensors"),
                         (14, None)]:
        write_checkpoint(ckpts / f"checkpoint-{step}", step)
        if step == 8:
            (ckpts / "checkpoint-8" / damage).unlink()  # the adapter is written, the trainer state not yet
        elif damage:
            path = ckpts / f"checkpoint-{step}" / damage
            path.write_bytes(path.read_bytes()[:-20])  # cut short
    (ckpts / "checkpoint-14" / "trainer_state.json").write_text('{"global_st')
    write_checkpoint(ckpts / "checkpoint-16.tmp", 16)
    for step in (4, 6, 8, 10, 12, 14):
        assert checkpoint_problem(ckpts / f"checkpoint-{step}"), step
    assert checkpoint_problem(ckpts / "checkpoint-2") is None
    assert last_checkpoint(tmp_path) == str(ckpts / "checkpoint-2")
    write_jsonl(tmp_path / "train_log.jsonl", [{"step": s, "loss": 1.0} for s in range(1, 15)])
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert resume_point(tmp_path, resume=True) == str(ckpts / "checkpoint-2")
    assert "checkpoint-14 is incomplete or damaged (trainer_state.json" in caplog.text
    assert "checkpoint-10 is incomplete or damaged (optimizer.pt" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-16.tmp", "checkpoint-2"]
    assert [r["step"] for r in log_rows(tmp_path)] == [1, 2]


# --- sft and rm resumed after a kill


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_after_kill_in_final_save_ends_at_max_steps(runs, stage, tmp_path):
    """Killed after the checkpoint at max_steps: the resumed run trains no step more (HF would train step 9)."""
    from safetensors.torch import load_file

    cfgs, done, _ = runs
    out = tmp_path / stage
    killed_copy(done[stage], out)
    run(stage, **cfgs[stage], output_dir=out, resume=True)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(done[stage] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage,tear", [("sft", "trainer_state.json"), ("rm", "optimizer.pt")])
def test_resume_skips_a_torn_checkpoint_and_drops_later_log_rows(runs, stage, tear, tmp_path):
    """checkpoint-8 torn (sft: adapter without trainer state) or damaged (rm: optimizer.pt cut short): the run resumes
    from checkpoint-4, ends at step 8 with the uninterrupted run's loss, and logs each step once."""
    cfgs, done, _ = runs
    out = tmp_path / stage
    work = killed_copy(done[stage], out)
    torn = work / "checkpoints" / "checkpoint-8" / tear
    if tear == "trainer_state.json":
        torn.unlink()
    else:
        torn.write_bytes(torn.read_bytes()[:100])
    run(stage, **cfgs[stage], output_dir=out, resume=True)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] == pytest.approx(log_rows(done[stage])[-1]["loss"], rel=1e-3)


# --- NaN


def poison_training_after(monkeypatch, steps: int):
    """Make the loader's model return NaN embeddings from training forward pass ``steps + 1`` on."""
    import rlhf.loader

    real = rlhf.loader.load_model

    def load_model(*args, **kw):
        model = real(*args, **kw)
        calls = [0]

        def hook(module, inputs, output):
            calls[0] += module.training
            return output * float("nan") if calls[0] > steps else output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(rlhf.loader, "load_model", load_model)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_nan_stops_at_its_step_and_keeps_only_finite_checkpoints(runs, stage, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfgs, _, _ = runs
    poison_training_after(monkeypatch, 5)
    out = tmp_path / stage
    with pytest.raises(DivergedError,
                       match=r"not finite at step 6; stopping. The last good checkpoint is .*checkpoint-4"):
        run(stage, **dict(cfgs[stage], save_steps=2), output_dir=out)
    assert not out.exists()
    ckpts = sorted((work_dir(out) / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]  # save_total_limit 2
    for c in ckpts:
        assert all(torch.isfinite(t).all() for t in load_file(str(c / "adapter_model.safetensors")).values())


def test_diverging_learning_rate_never_finishes(runs, tmp_path):
    """No eval set, learning_rate 1e30: stops at the first non-finite gradient, no folder a next stage accepts."""
    cfgs, _, _ = runs
    out = tmp_path / "sft"
    with pytest.raises(DivergedError, match=r"gradient is not finite at step \d+"):
        run("sft", **dict(cfgs["sft"], learning_rate=1e30), output_dir=out)
    assert not out.exists()


def test_resumed_checkpoint_with_nan_weights_is_refused_and_removed(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    cfgs, done, _ = runs
    out = tmp_path / "sft"
    work = killed_copy(done["sft"], out)
    adapter = work / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(adapter)).items()}, str(adapter))
    with pytest.raises(DivergedError,
                       match=r"weights are not finite at step 8; stopping. The last good checkpoint is .*checkpoint-4"):
        run("sft", **cfgs["sft"], output_dir=out, resume=True)
    assert not out.exists() and not adapter.parent.exists()


# --- the working folder: one writer, atomic replace, failed starts


def test_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "sft"
    holder = subprocess.Popen([sys.executable, "-c",
                               f"from rlhf.manifest import prepare_output; prepare_output({str(out)!r}); "
                               "print('ready', flush=True); import time; time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "ready"
        for kw in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(StageError, match=rf"being written by another running process \(pid {holder.pid}"):
                prepare_output(out, **kw)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert prepare_output(out, resume=True) == work_dir(out)  # the kernel dropped the dead process's lock
    unlock_output(out)


def finish(out, text: str):
    work = prepare_output(out, overwrite=True)
    (work / "weights.bin").write_text(text)
    return finish_output(work, out, stage="sft", config={}, base_model="tiny", launch={"num_processes": 1})


def test_overwrite_swaps_the_finished_folder_atomically(tmp_path, monkeypatch):
    """A kill while the replaced folder is deleted leaves the new folder complete in place, never a half-deleted old
    one; the aside folder it leaves does not block the next run."""
    out = tmp_path / "sft"
    finish(out, "old")
    real = shutil.rmtree

    def killed_while_deleting(path, *args, **kw):
        if (Path(path) / "manifest.json").is_file():
            (Path(path) / "weights.bin").unlink()
            raise KeyboardInterrupt("SIGKILL")
        real(path, *args, **kw)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        finish(out, "new")
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (out / "weights.bin").read_text() == "new" and read_manifest(out)["stage"] == "sft"
    finish(out, "newer")
    assert (out / "weights.bin").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_failed_start_leaves_no_working_folder(runs, tmp_path):
    from rlhf.data import DataError

    cfgs, done, data = runs
    with pytest.raises(DataError):
        run("sft", **dict(cfgs["sft"], dataset=["no_such_dataset"]), output_dir=tmp_path / "a")
    with pytest.raises(Exception, match="no_such_template"):
        run("sft", **dict(cfgs["sft"], template="no_such_template"), output_dir=tmp_path / "b")
    with pytest.raises(DataError):
        run("rm", **dict(cfgs["rm"], dataset=[data]), output_dir=tmp_path / "c")  # instruction rows, not pairs
    with pytest.raises(DataError):
        run("ppo", **dict(ppo_cfg(done, data), dataset=["no_such_dataset"]), output_dir=tmp_path / "d")
    with pytest.raises(DataError):
        pt.run(load_config(pt.PTConfig, None, dict(dataset=["no_such_corpus"], output_dir=str(tmp_path / "e"))))
    assert list(tmp_path.iterdir()) == []


def test_working_folder_without_checkpoint_is_no_unfinished_run(tmp_path):
    out = tmp_path / "sft"
    work = prepare_output(out)
    (work / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # torn: not a checkpoint
    unlock_output(out)
    assert prepare_output(out) == work and not (work / "checkpoints").exists()
    write_checkpoint(work / "checkpoints" / "checkpoint-2", 2)
    with pytest.raises(StageError, match="holds an unfinished run"):
        prepare_output(out)
    unlock_output(out)


# --- PPO: a planted pickle never runs


class Payload:
    """Unpickling it writes a file: what a planted optimizer.pt or RNG state would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def ppo_cfg(done, data) -> dict:
    return dict(sft_dir=str(done["sft"]), rm_dir=str(done["rm"]), dataset=[data], max_steps=4, save_steps=2,
                batch_size=4,
                mini_batch_size=4, per_device_train_batch_size=4, ppo_epochs=1, max_new_tokens=4, eval_samples=0,
                max_prompt_length=48, learning_rate=1e-3, seed=5)


@pytest.fixture(scope="module")
def ppo_run(runs, tmp_path_factory):
    cfgs, done, data = runs
    tmp = tmp_path_factory.mktemp("ppo_faults")
    cfg = ppo_cfg(done, data)
    return cfg, Path(run("ppo", **cfg, output_dir=tmp / "ppo"))


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng_state_0.pth"])
def test_ppo_resume_never_unpickles_a_planted_file(ppo_run, planted, tmp_path, caplog):
    """optimizer.pt: the checkpoint is damaged for every stage, resume falls back to the one before and ends as the
    uninterrupted run; the RNG state: a one-line error naming the file. The payload never runs."""
    cfg, finished = ppo_run
    out, marker = tmp_path / "ppo", tmp_path / "payload_ran"
    work = killed_copy(finished, out)
    torch.save({"state": Payload(marker)}, work / "checkpoints" / "checkpoint-4" / planted)
    if planted == "rng_state_0.pth":
        with pytest.raises(StageError, match=r"rng_state_0.pth is not a plain tensor file.*delete .*checkpoint-4"):
            run("ppo", **cfg, output_dir=out, resume=True)
    else:
        with caplog.at_level(logging.WARNING, logger="rlhf"):
            run("ppo", **cfg, output_dir=out, resume=True)
        assert "checkpoint-4 is incomplete or damaged (optimizer.pt" in caplog.text
        for key in ("policy_loss", "value_loss", "score_mean"):
            assert log_rows(out, key)[-1][key] == pytest.approx(log_rows(finished, key)[-1][key], rel=1e-3, abs=1e-6)
        assert [r["step"] for r in log_rows(out, "score_mean")] == [1, 2, 3, 4]
    assert not marker.exists()


# --- two processes (accelerate launch, gloo): only the main one locks, all resume from the same checkpoint


def test_two_processes_resume_past_a_torn_checkpoint_and_refuse_a_second_writer(runs, tmp_path):
    from test_multiprocess import CPU_CONFIG, free_port

    cfgs, done, _ = runs

    def launch(out, **extra):
        args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "--num_processes",
                "2", "--main_process_port", str(free_port()), "-m", "rlhf", "sft"]
        for k, v in dict(cfgs["sft"], output_dir=out, **extra).items():
            args += [f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
        return subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=240)

    out = tmp_path / "sft"
    work = killed_copy(done["sft"], out)
    (work / "checkpoints" / "checkpoint-8" / "trainer_state.json").unlink()
    prepare_output(out, resume=True)  # this process holds the lock: the launch must fail fast, not hang
    r = launch(out, resume=True)  # rank 0 refuses (18 s here, imports included); the launcher stops rank 1
    assert r.returncode != 0 and "being written by another running process" in r.stdout + r.stderr
    unlock_output(out)
    r = launch(out, resume=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))
