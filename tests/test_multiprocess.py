"""Every stage under `accelerate launch` with 2 CPU processes (gloo): both ranks end with identical trainable
weights, the loss falls, and one finished folder is written. `rlhf pipeline` launches stages through accelerate
and torchrun from its YAML, and the processes other than the main one stay quiet."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from helpers import write_jsonl
from rlhf.manifest import read_manifest

# Runs one stage on every rank and saves that rank's trainable weights at the end (through the stage's own
# end-of-training hook: the Trainer callback for sft/rm, the last checkpoint for ppo).
SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    stage, values, dump = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    from rlhf.config import load_config
    from rlhf.cli import STAGES
    import importlib
    mod = importlib.import_module(STAGES[stage][0])

    def save(named):
        torch.save({n: p.detach().clone() for n, p in named if p.requires_grad}, f"{dump}/rank{rank}.pt")

    if stage == "ppo":
        orig = mod.save_checkpoint
        def save_checkpoint(work, step, roles, *a, **k):
            save(roles.model.named_parameters())
            return orig(work, step, roles, *a, **k)
        mod.save_checkpoint = save_checkpoint
    else:
        import rlhf.train_utils as tu
        orig = tu.log_callback
        def log_callback(work):
            cb = orig(work)
            class WithDump(type(cb)):
                def on_train_end(self, args, state, control, model=None, **kw):
                    save(model.named_parameters())
            return WithDump()
        tu.log_callback = log_callback
    mod.run(load_config(getattr(mod, STAGES[stage][1]), None, values))
''')


CPU_CONFIG = Path(__file__).parents[1] / "configs" / "accelerate" / "cpu.yaml"


def launch(tmp_path, stage, values):
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT)
    dump = tmp_path / f"dump_{stage}"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "--num_processes", "2",
           "--main_process_port", str(port), str(script), stage, json.dumps(values), str(dump)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert w0.keys() == w1.keys() and len(w0) > 0
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], msg=f"{stage}: ranks differ in {k}")
    return read_manifest(values["output_dir"])


def write_data(tmp_path) -> tuple[str, str]:
    rows = [{"instruction": f"Which is larger, {a} or {a + 5}?", "output": str(a + 5), "chosen": str(a + 5), "rejected": str(a)}
            for a in range(10, 74)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{k: r[k] for k in ("instruction", "output")} for r in rows])
    pref_data = write_jsonl(tmp_path / "pref.jsonl", [{k: r[k] for k in ("instruction", "chosen", "rejected")} for r in rows])
    return sft_data, pref_data


def test_sft_rm_ppo_on_two_processes(tiny_model_dir, tmp_path):
    sft_data, pref_data = write_data(tmp_path)
    common = dict(max_steps=12, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=2, save_steps=100,
                  max_length=64, lora_target="all-linear")
    sft = launch(tmp_path, "sft", dict(common, model_name_or_path=tiny_model_dir("llama"), dataset=[str(sft_data)],
                                       output_dir=str(tmp_path / "sft"), task_eval_samples=0))
    assert sft["metrics"]["train_loss_last"] < sft["metrics"]["train_loss_first"]
    rm = launch(tmp_path, "rm", dict(common, sft_dir=str(tmp_path / "sft"), dataset=[str(pref_data)], output_dir=str(tmp_path / "rm")))
    assert rm["metrics"]["train_loss_last"] < rm["metrics"]["train_loss_first"]
    ppo = launch(tmp_path, "ppo", dict(sft_dir=str(tmp_path / "sft"), rm_dir=str(tmp_path / "rm"), dataset=[str(sft_data)],
                                       output_dir=str(tmp_path / "ppo"), max_steps=3, batch_size=4, mini_batch_size=4,
                                       per_device_train_batch_size=4, ppo_epochs=1, max_new_tokens=4, eval_samples=0,
                                       save_steps=100, max_prompt_length=64, learning_rate=1e-3))
    assert ppo["metrics"]["steps"] == 3
    assert not list(tmp_path.glob("*.partial"))


def test_pipeline_launches_stages_on_two_processes(tiny_model_dir, tmp_path):
    """sft under accelerate launch (the pipeline's `launch:`), rm under torchrun (its own `launch:`); a rerun skips both."""
    sft_data, pref_data = write_data(tmp_path)
    common = dict(max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1, save_steps=100, max_length=64)
    spec = {"output_root": str(tmp_path / "runs"), "shared": {"model_name_or_path": tiny_model_dir("llama")},
            "launch": {"launcher": "accelerate", "config_file": str(CPU_CONFIG), "num_processes": 2},
            "stages": {"sft": dict(common, dataset=[str(sft_data)], task_eval_samples=0),
                       "rm": dict(common, dataset=[str(pref_data)], launch={"launcher": "torchrun", "num_processes": 2})}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = lambda: subprocess.run([sys.executable, "-m", "rlhf", "pipeline", str(path)], env=env, capture_output=True, text=True, timeout=240)  # noqa: E731
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "accelerate.commands.launch --config_file" in r.stdout and "torch.distributed.run --nproc_per_node 2" in r.stdout
    for stage in ("sft", "rm"):
        m = read_manifest(tmp_path / "runs" / stage)
        assert m["stage"] == stage and m["metrics"]["train_loss_last"] is not None
        # one process talks: the stage's summary and "done" line are not repeated by the second process
        assert r.stdout.count(f"done: {tmp_path / 'runs' / stage}") == 1, r.stdout
        assert r.stderr.count(f"[rlhf] {stage} metrics:") == 1, r.stderr[-3000:]
    r = run()  # the requested config survives the trip through the launched stage's YAML: nothing reruns
    assert r.returncode == 0 and "sft: skipped, rm: skipped" in r.stdout, r.stdout + r.stderr[-2000:]
