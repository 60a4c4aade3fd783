"""GRPO stage: group advantages and the GRPO loss (rlhf/rl.py) against hand-computed values, reward functions
(rlhf/rewards.py), and `rlhf grpo` end to end on tiny parents: a Python reward and the RM folder, resume after
SIGKILL, the NaN stop and bad inputs."""
import math
import os
from pathlib import Path

import pytest
import torch

from rlhf import rl

# ----------------------------------------------------------------------------------------------------------------
# the maths, by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])  # groups of 2: (1, 0), (0, 1), (3, 3)
    # grpo: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.7071 + 1e-4); equal rewards -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(rl.group_advantages(r, 2), torch.tensor([a, -a, -a, a, 0.0, 0.0]))
    assert torch.allclose(rl.group_advantages(r, 2, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    # rloo, k = 3: r_i - mean of the other two
    r3 = torch.tensor([1.0, 2.0, 6.0])
    assert torch.allclose(rl.group_advantages(r3, 3, "rloo"), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    assert torch.allclose(rl.group_advantages(r3, 3, "grpo"),
                          (r3 - 3.0) / (math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) + 1e-4))
    with pytest.raises(ValueError, match="whole groups"):
        rl.group_advantages(r3, 2)
    with pytest.raises(ValueError, match="k >= 2"):
        rl.group_advantages(r3, 1)


def test_grpo_loss_aggregations_by_hand():
    # two sequences: ratios (1.5, 0.5) with A = 1 (row 0, 2 tokens), ratio 1.1 with A = -1 (row 1, 1 token + pad)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 7.0]]))
    old, mask, adv = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, -1.0])
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2, -0.5 ; 1.1 (as in test_ppo's policy loss)
    loss, stats = rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="grpo")
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.1) / 2)  # mean of sequence means
    assert stats["policy_clipfrac"] == pytest.approx(1 / 3)
    assert rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="dapo")[0].item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="dr_grpo", max_len=4)[0].item() == pytest.approx(
        (-1.2 - 0.5 + 1.1) / (2 * 4))
    # micro-batches: each row's share of the two-row batch adds up to the batch's loss
    for lt in ("grpo", "dapo", "dr_grpo"):
        whole = rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type=lt, max_len=4)[0]
        parts = sum(rl.grpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2, loss_type=lt,
                                 max_len=4, batch_rows=2, batch_tokens=mask.sum())[0] for i in range(2))
        assert parts.item() == pytest.approx(whole.item()), lt
    with pytest.raises(ValueError, match="loss_type"):
        rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="ppo")


def test_grpo_kl_term_is_k3_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # exp(ref - logp) - (ref - logp) - 1
    loss, stats = rl.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, ref_logp=ref,
                               kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2)  # A = 0: only the KL term
    assert stats["kl"] == pytest.approx(sum(k3) / 2)
    # its gradient: d/dlogp of exp(ref - logp) + logp = 1 - exp(ref - logp), times 0.1 / 2 (token mean)
    x = logp.clone().requires_grad_(True)
    rl.grpo_loss(x, x.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, ref_logp=ref, kl_coef=0.1)[0].backward()
    want = [0.05 * (1 - math.exp(-0.5)), 0.05 * (1 - math.exp(1.0))]
    assert torch.allclose(x.grad, torch.tensor([want]))


def test_on_policy_grpo_gradient_is_the_advantage_weighted_log_prob_gradient():
    """ratio = 1 (old = detached current): the loss's gradient is -A/len per token, the REINFORCE gradient."""
    x = torch.tensor([[-0.3, -0.7, -1.0]], requires_grad=True)
    rl.grpo_loss(x, x.detach(), torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]]), 0.2)[0].backward()
    assert torch.allclose(x.grad, torch.tensor([[-1.0, -1.0, 0.0]]))


def rss_anon_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="reads RssAnon from /proc; a fixed glibc mmap threshold leaves no heap holes to return")
def test_release_freed_memory_returns_the_heaps_holes():
    """Blocks freed between live ones stay in glibc's heap (RSS) until online.release_freed_memory hands them back,
    as an update's activations do between micro-batches."""
    from rlhf.online import _malloc_trim, release_freed_memory

    if _malloc_trim() is None:
        pytest.skip("no glibc malloc_trim")
    torch.ones(8 << 18)  # an 8 MiB mmapped block, freed: the mmap threshold rises, 1 MiB blocks come from the heap
    blocks = [torch.ones(1 << 18) for _ in range(128)]  # 128 x 1 MiB, touched
    del blocks[::2]  # 64 holes between live blocks: not the heap's top, so not trimmed on free
    held = rss_anon_mib()
    release_freed_memory(torch.device("cpu"))
    assert held - rss_anon_mib() > 40
    release_freed_memory("cuda")  # a no-op there


# ----------------------------------------------------------------------------------------------------------------
# Python reward functions


def length_reward(prompts, completions, **columns):
    """A test reward: longer completions score higher; it sees the prompts as messages and the dataset columns."""
    assert isinstance(prompts[0], list) and prompts[0][-1]["role"] == "user"
    assert len(columns["answer"]) == len(completions)
    return [float(len(c)) for c in completions]


def wrong_type_reward(prompts, completions, **columns):
    return "high"


def short_reward(prompts, completions, **columns):
    return [1.0]


def test_reward_functions_load_and_check():
    from rlhf.config import ConfigError
    from rlhf.rewards import load_reward_function

    rows = [{"answer": "70"}, {"answer": "12"}]
    demo, pref = load_reward_function("rlhf.rewards:demo_task"), load_reward_function("rlhf.rewards:demo_pref")
    assert demo([[], []], ["70", "The answer is 12"], rows) == [1.0, 0.0]
    assert demo([[], []], ["71", "12."], rows) == [0.0, 1.0]  # right in either layout
    assert pref([[], []], ["70", "12."], rows) == [1.0, 0.0]  # right and the number alone
    assert load_reward_function("test_grpo:length_reward")([[{"role": "user", "content": "q"}]] * 2, ["ab", "c"],
                                                          rows) == [2.0, 1.0]
    for spec, match in (("rlhf.rewards", "is not module:function"),
                        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                        ("rlhf.rewards:demo_tsk", "has no function 'demo_tsk'; did you mean 'demo_task'"),
                        ("rlhf.demo_task:extract_answer", r"must take \(prompts, completions")):
        with pytest.raises(ConfigError, match=match):
            load_reward_function(spec)
    with pytest.raises(ConfigError, match="returned str 'high'; it must return a list of floats"):
        load_reward_function("test_grpo:wrong_type_reward")([[], []], ["a", "b"], rows)
    with pytest.raises(ConfigError, match="returned 1 rewards for 2 completions"):
        load_reward_function("test_grpo:short_reward")([[], []], ["a", "b"], rows)


# ----------------------------------------------------------------------------------------------------------------
# end to end on tiny parents (random LoRA SFT and RM folders, as tests/test_ppo.py builds them)


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_model_dir):
    from test_ppo import make_parents

    return make_parents(tmp_path_factory.mktemp("grpo_parents"), tiny_model_dir("llama"))


def grpo_values(parents, out, **kw) -> dict:
    values = dict(sft_dir=parents["sft"], rm_dir=parents["rm"], reward_funcs=["test_grpo:length_reward"],
                  output_dir=str(out), dataset="demo_prompts", eval_dataset="demo_prompts_eval", num_samples=24,
                  batch_size=2, num_generations=4, mini_batch_size=4, per_device_train_batch_size=2, num_iterations=2,
                  max_steps=4, max_new_tokens=6, eval_samples=4, save_steps=2, sample_every=2, learning_rate=1e-3,
                  max_prompt_length=48, seed=3)
    values.update(kw)
    return values


def run_grpo(values: dict):
    from rlhf.config import load_config
    from rlhf.stages import grpo

    return grpo.run(load_config(grpo.GRPOConfig, None, {k: str(v) if not isinstance(v, list) else v
                                                        for k, v in values.items()}))


def test_grpo_with_rm_and_python_reward_writes_a_policy_folder(parents, tmp_path):
    import json

    from rlhf.manifest import read_manifest
    from rlhf.stage_folder import POLICIES, load_stage, open_stage

    out = run_grpo(grpo_values(parents, tmp_path / "grpo", reward_weights=[0.5, 2.0]))
    m = read_manifest(out)
    assert m["stage"] == "grpo" and m["metrics"]["steps"] == 4 and m["parent"]["stage"] == "sft"
    rows = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:  # the weighted sum of the two rewards (no missing-eos penalty)
        assert r["reward_mean"] == pytest.approx(0.5 * r["reward_rm"] + 2.0 * r["reward_length_reward"], rel=1e-5)
        assert {"kl", "loss", "policy_clipfrac", "entropy", "grad_norm", "eos_share"} <= set(r)
    assert {"eval_reward_greedy", "eval_task_metric_greedy"} <= set(rows[0])
    assert (tmp_path / "grpo" / "training_curves.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # a policy folder: the commands that open policies take it, and its adapter loads with plain peft
    st = open_stage(out, POLICIES, "rlhf generate")
    model, tok = load_stage(st)
    assert model.active_adapter == "default" and tok.chat_template


def test_grpo_python_reward_only_no_reference(parents, tmp_path):
    """No rm_dir and kl_coef 0: only the policy adapter is loaded; RLOO advantages, dapo loss."""
    import json

    out = run_grpo(grpo_values(parents, tmp_path / "g", rm_dir="", kl_coef=0, advantage_estimator="rloo",
                               loss_type="dapo", max_steps=2, num_iterations=1, mini_batch_size=0, eval_samples=0))
    rows = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
    assert len(rows) == 2 and "reward_rm" not in rows[0] and "kl" not in rows[0]
    assert rows[0]["policy_clipfrac"] == 0.0 and rows[0]["approx_kl"] == 0.0  # on-policy: ratio 1


def test_grpo_bad_inputs_are_one_line(parents, tmp_path):
    from rlhf.config import ConfigError, load_config
    from rlhf.manifest import StageError, work_dir
    from rlhf.stages.grpo import GRPOConfig

    for kw, match in ((dict(num_generations=1), "num_generations' must be >= 2"),
                      (dict(mini_batch_size=3), r"mini_batch_size' \(3\) must divide batch_size x num_generations"),
                      (dict(rm_dir="", reward_funcs=[]), "reward_funcs' is empty and no rm_dir"),
                      (dict(reward_weights=[1.0]), "has 1 weights for 2 rewards")):
        with pytest.raises(ConfigError, match=match):
            load_config(GRPOConfig, None, {k: v for k, v in grpo_values(parents, tmp_path / "x", **kw).items()})
    with pytest.raises(ConfigError, match="has no function 'nope'"):  # before any folder is made
        run_grpo(grpo_values(parents, tmp_path / "bad", reward_funcs=["test_grpo:nope"]))
    assert not work_dir(tmp_path / "bad").exists()
    with pytest.raises(StageError, match="is the output of `rlhf rm`, but rlhf grpo needs a sft/dpo/grpo/ppo"):
        run_grpo(grpo_values(parents, tmp_path / "bad", sft_dir=parents["rm"]))
    # a reward of the wrong type stops the first step with one line; the corrected rerun is not blocked
    with pytest.raises(ConfigError, match="wrong_type_reward returned str"):
        run_grpo(grpo_values(parents, tmp_path / "bad", reward_funcs=["test_grpo:wrong_type_reward"], max_steps=1))
    run_grpo(grpo_values(parents, tmp_path / "bad", max_steps=1, eval_samples=0))


def test_grpo_nan_stops_at_its_step(parents, tmp_path, monkeypatch):
    from rlhf import rl as rl_mod
    from rlhf.manifest import work_dir
    from rlhf.train_utils import DivergedError

    calls, real = [0], rl_mod.grpo_loss

    def poisoned(*a, **k):
        calls[0] += 1
        loss, stats = real(*a, **k)
        return (loss * float("nan"), stats) if calls[0] > 16 else (loss, stats)  # 8 micro-batches a step

    monkeypatch.setattr(rl_mod, "grpo_loss", poisoned)
    with pytest.raises(DivergedError, match=r"not finite at GRPO step 3; stopping. The last good checkpoint is "
                                            r".*checkpoint-2"):
        run_grpo(grpo_values(parents, tmp_path / "nan", eval_samples=0))
    assert not (tmp_path / "nan").exists() and (work_dir(tmp_path / "nan") / "checkpoints" / "checkpoint-2").is_dir()


def test_grpo_sigkill_then_resume_matches_uninterrupted(parents, tmp_path):
    from test_resume import kill_after_checkpoint, last_loss

    from rlhf.manifest import read_manifest

    base = grpo_values(parents, tmp_path, max_steps=6, eval_samples=0, reward_funcs=["rlhf.rewards:demo_task"])
    base.pop("output_dir")
    run_grpo(dict(base, output_dir=tmp_path / "straight"))
    out = tmp_path / "killed"
    kill_after_checkpoint("grpo", dict(base, output_dir=out), ckpt_step=2)  # 4 steps left: killed mid-run
    run_grpo(dict(base, output_dir=out, resume=True))
    a, b = read_manifest(tmp_path / "straight"), read_manifest(out)
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == 6
    for key in ("loss", "reward_mean", "kl"):
        assert last_loss(out, key) == pytest.approx(last_loss(tmp_path / "straight", key), rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_grpo_on_a_quantized_base_trains_the_lora(parents, tmp_path, quantization):
    """One quantized base (bitsandbytes) carries policy, ref and reward; after the rollout's generate and no-grad
    passes the policy LoRA still gets a gradient (docs/known_traps.md: the 4-bit CPU trap)."""
    import json

    from rlhf.manifest import read_manifest

    out = run_grpo(grpo_values(parents, tmp_path / quantization, quantization=quantization, max_steps=2,
                               eval_samples=0, num_iterations=1, mini_batch_size=0, per_device_train_batch_size=8))
    assert read_manifest(out)["config"]["quantization"] == quantization
    rows = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
    assert all(r["grad_norm"] > 1e-4 and math.isfinite(r["loss"]) for r in rows)
