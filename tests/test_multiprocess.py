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

import pytest
import torch
import yaml

from helpers import write_jsonl
from rlhf.manifest import read_manifest

# Runs one stage on every rank and saves that rank's trainable weights: at the end of training for sft/rm (the
# Trainer callback), after every update for ppo and grpo (the file holds the last update's).
SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    stage, values, dump = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    from rlhf.config import load_config
    from rlhf.stages import STAGES
    mod = STAGES[stage].load()

    def save(named):
        torch.save({n: p.detach().clone() for n, p in named if p.requires_grad}, f"{dump}/rank{rank}.pt")

    if stage in ("ppo", "grpo"):
        orig = getattr(mod, f"{stage}_update")
        def update(roles, *a, **k):
            out = orig(roles, *a, **k)
            save(roles.model.named_parameters())
            return out
        setattr(mod, f"{stage}_update", update)
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
    mod.run(load_config(STAGES[stage].config_class(), None, values))
    from rlhf.dist import close_process_group
    close_process_group()  # as the CLI does at the end of a stage
''')


CPU_CONFIG = Path(__file__).parents[1] / "configs" / "accelerate" / "cpu.yaml"


def free_port() -> int:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path, stage, values):
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT)
    dump = tmp_path / f"dump_{stage}"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script), stage, json.dumps(values), str(dump)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert w0.keys() == w1.keys() and len(w0) > 0
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], msg=f"{stage}: ranks differ in {k}")
    return read_manifest(values["output_dir"])


def write_data(tmp_path) -> tuple[str, str]:
    # the rejected reply is a dodge, not the smaller number: a tiny RM learns that in 12 steps (a loss of ln 2 -> at
    # most 0.09 over seeds 42, 0-3), while telling a+5 from a stays at ln 2 that long (no margin to test on)
    rows = [{"instruction": f"Which is larger, {a} or {a + 5}?", "output": str(a + 5), "chosen": str(a + 5),
             "rejected": "I am not sure."}
            for a in range(10, 74)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{k: r[k] for k in ("instruction", "output")} for r in rows])
    pref_data = write_jsonl(tmp_path / "pref.jsonl",
                            [{k: r[k] for k in ("instruction", "chosen", "rejected")} for r in rows])
    return sft_data, pref_data


COMMON = dict(max_steps=12, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=2, save_steps=100,
              max_length=64, lora_target="all-linear")


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, tmp_path_factory):
    """sft -> rm -> ppo, each on 2 processes (DDP over gloo); every rank's trainable weights are compared."""
    tmp = tmp_path_factory.mktemp("ddp")
    sft_data, pref_data = write_data(tmp)
    values = {"sft": dict(COMMON, model_name_or_path=tiny_model_dir("llama"), dataset=[sft_data],
                          output_dir=str(tmp / "sft"), task_eval_samples=0),
              "rm": dict(COMMON, sft_dir=str(tmp / "sft"), dataset=[pref_data], output_dir=str(tmp / "rm")),
              "ppo": dict(sft_dir=str(tmp / "sft"), rm_dir=str(tmp / "rm"), dataset=[sft_data], eval_dataset=[sft_data],
                          eval_samples=3, output_dir=str(tmp / "ppo"), max_steps=3, batch_size=4, mini_batch_size=4,
                          per_device_train_batch_size=4, ppo_epochs=1, max_new_tokens=4, save_steps=100,
                          max_prompt_length=64, learning_rate=1e-3)}
    manifests = {stage: launch(tmp, stage, values[stage]) for stage in ("sft", "rm", "ppo")}
    return tmp, values, manifests


def test_sft_rm_ppo_on_two_processes(ddp_runs):
    tmp, _, m = ddp_runs
    assert m["sft"]["metrics"]["train_loss_last"] < m["sft"]["metrics"]["train_loss_first"] - 0.2  # 6.2 -> 5.7
    # the RM learns: from ln 2 (0.69, the zero score head) to below half of it (<= 0.09 over seeds)
    assert m["rm"]["metrics"]["train_loss_first"] > 0.6 and m["rm"]["metrics"]["train_loss_last"] < 0.35
    assert m["ppo"]["metrics"]["steps"] == 3
    # the held-out prompts (3) are shared out over the processes (2 + 1) and their means weighted back together
    assert 0.0 <= m["ppo"]["metrics"]["eval_eos_share_greedy_before"] <= 1.0
    for stage in ("sft", "rm", "ppo"):
        assert m[stage]["launch"] == {"num_processes": 2, "distributed_type": "MULTI_CPU"}
    assert not list(tmp.glob("*.partial"))


def test_grpo_on_two_processes(ddp_runs):
    """grpo averages its gradients by hand (rlhf.online.average_gradients) and gives each process its own prompts:
    both ranks end with the same policy adapter, and one folder is written."""
    tmp, values, _ = ddp_runs
    m = launch(tmp, "grpo", dict(sft_dir=values["ppo"]["sft_dir"], rm_dir=values["ppo"]["rm_dir"], reward_funcs=[],
                                 dataset=values["ppo"]["dataset"], output_dir=str(tmp / "grpo"), max_steps=2,
                                 batch_size=2, num_generations=4, mini_batch_size=8, per_device_train_batch_size=4,
                                 max_new_tokens=4, eval_samples=0, save_steps=100, max_prompt_length=64,
                                 learning_rate=1e-3))
    assert m["metrics"]["steps"] == 2
    assert m["launch"] == {"num_processes": 2, "distributed_type": "MULTI_CPU"}


def require_deepspeed():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("RLHF_REQUIRE_DEEPSPEED"):
            pytest.fail("RLHF_REQUIRE_DEEPSPEED is set but deepspeed is not installed (scripts/test.sh installs "
                        ".[deepspeed])")
        pytest.skip("deepspeed is not installed: pip install -e '.[deepspeed]'")


def launch_cli(tmp_path, stage: str, values: dict, config_file: Path) -> dict:
    """`accelerate launch --config_file CONFIG_FILE -m rlhf <stage>` on 2 CPU processes, in float32."""
    cfg = tmp_path / f"{stage}.yaml"
    cfg.write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes",
           "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "rlhf", stage, str(cfg)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_manifest(values["output_dir"])


def test_deepspeed_zero3_offload_sft_and_zero2_rm_match_ddp(ddp_runs, tmp_path):
    """The configs in configs/accelerate/ run on CPUs too: ZeRO-3 (weights sharded while loading, optimizer and
    parameters offloaded) for sft, ZeRO-2 for rm; their adapters equal the DDP runs' and load with plain peft."""
    from safetensors.torch import load_file

    require_deepspeed()
    ddp_tmp, values, _ = ddp_runs
    configs = Path(__file__).parents[1] / "configs" / "accelerate"
    # sft with a held-out task metric: under ZeRO-3 every process must generate, or the main one waits forever
    sft = launch_cli(tmp_path, "sft",
                     dict(values["sft"], output_dir=str(tmp_path / "sft"), eval_dataset=["demo_sft_eval"],
                                           task_eval_samples=4, eval_steps=100),
                                           configs / "deepspeed_zero3_offload.yaml")
    assert sft["launch"] == {"num_processes": 2, "distributed_type": "DEEPSPEED", "zero_stage": 3}
    assert sft["metrics"]["task_metric_after"] is not None
    rm = launch_cli(tmp_path, "rm", dict(values["rm"], output_dir=str(tmp_path / "rm")),
                    configs / "deepspeed_zero2.yaml")
    assert rm["launch"]["zero_stage"] == 2
    for stage in ("sft", "rm"):
        ours = load_file(tmp_path / stage / "adapter_model.safetensors")
        ddp = load_file(ddp_tmp / stage / "adapter_model.safetensors")
        assert ours.keys() == ddp.keys() and any("score" in k for k in ours) == (stage == "rm")
        for k in ddp:
            torch.testing.assert_close(ours[k], ddp[k], atol=2e-4, rtol=1e-3,
                                       msg=f"{stage}: {k} differs from the DDP run")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(values["sft"]["model_name_or_path"]),
                              str(tmp_path / "sft"))


def test_pipeline_launches_stages_on_two_processes(tiny_model_dir, tmp_path):
    """sft under accelerate launch (the pipeline's `launch:`), rm under torchrun (its own `launch:`); a rerun skips
    both."""
    sft_data, pref_data = write_data(tmp_path)
    common = dict(max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1, save_steps=100,
                  max_length=64)
    spec = {"output_root": str(tmp_path / "runs"), "shared": {"model_name_or_path": tiny_model_dir("llama")},
            "launch": {"launcher": "accelerate", "config_file": str(CPU_CONFIG), "num_processes": 2},
            "stages": {"sft": dict(common, dataset=[str(sft_data)], task_eval_samples=0),
                       "rm": dict(common, dataset=[str(pref_data)],
                                  launch={"launcher": "torchrun", "num_processes": 2})}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = lambda: subprocess.run([sys.executable, "-m", "rlhf", "pipeline", str(path)], env=env, capture_output=True,
                                 text=True, timeout=240)  # noqa: E731
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "accelerate.commands.launch --config_file" in r.stdout
    assert "torch.distributed.run --nproc_per_node 2" in r.stdout
    for stage in ("sft", "rm"):
        m = read_manifest(tmp_path / "runs" / stage)
        assert m["stage"] == stage and m["metrics"]["train_loss_last"] is not None
        # one process talks: the stage's summary and "done" line are not repeated by the second process
        assert r.stdout.count(f"done: {tmp_path / 'runs' / stage}") == 1, r.stdout
        assert r.stderr.count(f"[rlhf] {stage} metrics:") == 1, r.stderr[-3000:]
    r = run()  # the requested config survives the trip through the launched stage's YAML: nothing reruns
    assert r.returncode == 0 and "sft: skipped, rm: skipped" in r.stdout, r.stdout + r.stderr[-2000:]


def test_fsdp_on_cpu_is_refused(monkeypatch):
    """accelerate runs FSDP only on GPUs; on CPUs it would quietly train plain data parallel instead."""
    from rlhf.dist import process_state
    from rlhf.manifest import StageError

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(StageError, match="FSDP needs GPUs"):
        process_state()


STATS_SCRIPT = textwrap.dedent('''
    import torch, torch.distributed as dist
    from rlhf import rl
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same full batch on both ranks; each takes its half
    x_all, m_all, s_all = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float(), torch.randn(8)
    mine = slice(2 * rank, 2 * rank + 2)
    mean = (x_all * m_all).sum() / m_all.sum()
    var = ((x_all - mean) ** 2 * m_all).sum() / (m_all.sum() - 1)
    expected = (x_all - mean) * torch.rsqrt(var + 1e-8) * m_all
    torch.testing.assert_close(rl.masked_whiten(x_all[mine], m_all[mine]), expected[mine])
    norm = rl.ScoreNormalizer("normalize")
    out = norm(s_all[4 * rank : 4 * rank + 4])
    torch.testing.assert_close(out, ((s_all - s_all.mean()) / (s_all.std() + 1e-8))[4 * rank : 4 * rank + 4])
    assert norm.count == 8
    # Close the group before exiting: a gloo worker thread may still be releasing the last all-reduce's tensors,
    # which takes the GIL; during interpreter shutdown that thread is killed inside a C++ destructor and
    # std::terminate aborts the process ("terminate called without an active exception", SIGABRT).
    dist.destroy_process_group()
''')


def test_ppo_whitening_and_score_statistics_span_processes(tmp_path):
    """Advantage whitening and the running score statistics use every process's batch (torchrun, 2 processes)."""
    script = tmp_path / "stats.py"
    script.write_text(STATS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
