"""PPO stage: the algorithm (rlhf/rl.py) against hand-computed values, the one-base roles, the 4-bit gradient trap, an
end-to-end run with resume, and bad inputs. Tiny llama (hidden 64, 2 layers); SFT/RM parents are built
here with peft (random LoRA weights) and stage manifests, as `rlhf sft` / `rlhf rm` write them."""
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhf import rl
from rlhf.config import ConfigError, load_config
from rlhf.generation import left_pad, response_mask
from rlhf.manifest import StageError
from rlhf.stages import ppo
from rlhf.stages.ppo import PPOConfig

# ----------------------------------------------------------------------------------------------------------------
# the algorithm, by hand


def test_gae_by_hand():
    rewards = torch.tensor([[0.5, 1.0, 9.0]])  # the 9 lies after the end: ignored
    values = torch.tensor([[0.2, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1: delta = 1.0 + 0.9*0 - 0.4 = 0.6 ; t=0: delta = 0.5 + 0.9*0.4 - 0.2 = 0.66, adv = 0.66 + 0.72*0.6 = 1.092
    assert torch.allclose(adv, torch.tensor([[1.092, 0.6, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.292, 1.0, 0.0]]))


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    assert torch.allclose(rl.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(rl.masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)


def test_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 against old logp 0
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = rl.policy_loss(logp, torch.zeros(1, 3), adv, mask, cliprange=0.2)
    # per token max(-A*r, -A*clip(r)): max(-1.5, -1.2) = -1.2 ; max(-0.5, -0.8) = -0.5 ; max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert stats["policy_clipfrac"] == pytest.approx(1 / 3)
    assert stats["approx_kl"] == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3, rel=1e-5)
    # masked tokens do not count
    loss2, _ = rl.policy_loss(logp, torch.zeros(1, 3), adv, torch.tensor([[1.0, 1.0, 0.0]]), cliprange=0.2)
    assert loss2.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_value_loss_by_hand():
    values, old, returns = torch.tensor([[0.5, -0.1]]), torch.zeros(1, 2), torch.ones(1, 2)
    loss, stats = rl.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # clipped values 0.2, -0.1: max((0.5-1)^2, (0.2-1)^2) = 0.64 ; max(1.21, 1.21) = 1.21 ; 0.5 * mean
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["value_clipfrac"] == pytest.approx(0.5)


def test_kl_penalty_and_token_rewards_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(rl.kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert torch.allclose(rl.kl_penalty(logp, ref, "k3"), torch.tensor([k3]))
    kl = torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = rl.token_rewards(kl, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1 + 2.0, 0.0], [-0.02, -0.02, -0.02 - 1.0]]))


def test_kl_controller_by_hand():
    fixed = rl.KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    ctl = rl.KLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error 0.5 clipped to 0.2: 0.1 * (1 + 0.2 * 10/100)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)  # error -0.1: * (1 - 0.1 * 0.1)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    other = rl.KLController(1.0, 6.0, 100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_score_normalizer_by_hand():
    norm = rl.ScoreNormalizer("normalize")
    assert torch.allclose(norm(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    # running over 1,2,3,4: mean 2.5, unbiased std sqrt(5/3)
    assert norm(torch.tensor([4.0])).item() == pytest.approx(1.5 / math.sqrt(5 / 3), rel=1e-5)
    scale = rl.ScoreNormalizer("scale", clip=1.0)
    assert torch.allclose(scale(torch.tensor([1.0, 3.0])), torch.tensor([1.0 / math.sqrt(2), 1.0]), atol=1e-6)
    assert torch.equal(rl.ScoreNormalizer("none", clip=0.5)(torch.tensor([2.0, -0.1])), torch.tensor([0.5, -0.1]))


def test_missing_eos_penalty_after_normalisation():
    raw, ended = torch.tensor([1.0, 3.0]), torch.tensor([True, False])
    assert torch.equal(rl.shape_scores(raw, ended, rl.ScoreNormalizer(), 2.5), torch.tensor([1.0, 0.5]))
    assert torch.equal(rl.shape_scores(raw, ended, rl.ScoreNormalizer(), None), raw)
    shaped = rl.shape_scores(raw, ended, rl.ScoreNormalizer("normalize"), 1.0)  # (x - 2) / sqrt(2), then -1
    assert torch.allclose(shaped, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2) - 1.0]), atol=1e-6)


def test_response_mask_cuts_after_first_stop():
    responses = torch.tensor([[5, 7, 2, 9, 2], [5, 5, 5, 5, 5], [3, 2, 4, 4, 4]])
    mask, ended = response_mask(responses, [2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_config_checks():
    with pytest.raises(ConfigError, match="mini_batch_size.*must divide batch_size"):
        load_config(PPOConfig, None, {"batch_size": "8", "mini_batch_size": "3"})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(PPOConfig, None, {"gradient_accumulation_steps": "2"})
    with pytest.raises(ConfigError, match="temperature"):
        load_config(PPOConfig, None, {"temperature": "0"})


def test_optimizer_names_are_transformers_as_in_sft():
    """ppo builds cfg.optim as transformers does for sft/rm (Trainer.get_optimizer_cls_and_kwargs)."""
    built = {}
    for name in ("adamw_torch", "adamw_torch_fused", "lion_8bit"):
        if name == "lion_8bit":
            pytest.importorskip("bitsandbytes")
        p = torch.nn.Parameter(torch.ones(4, 4))
        opt = ppo.optimizer_for(load_config(PPOConfig, None, {"optim": name, "learning_rate": "0.1"}))([p])
        p.grad = torch.ones_like(p)
        opt.step()
        assert not torch.equal(p.detach(), torch.ones(4, 4)), name
        built[name] = opt
    assert type(built["adamw_torch"]) is torch.optim.AdamW and not built["adamw_torch"].defaults.get("fused")
    assert built["adamw_torch_fused"].defaults["fused"] is True  # was plain AdamW in ppo
    lion = type(built["lion_8bit"])
    assert lion.__module__.startswith("bitsandbytes") and lion.__name__ == "Lion"
    with pytest.raises(ConfigError, match=r"^ppo: key 'optim' is 'adamw_torhc', which transformers does not know; "
                                          r"did you mean 'adamw_torch'\?$"):
        ppo.optimizer_for(load_config(PPOConfig, None, {"optim": "adamw_torhc"}))


def test_optimizer_for_is_the_trainers_mapping(tmp_path):
    """optimizer_for reads transformers' optimizer mapping without importing transformers.Trainer: the class and
    keywords are those Trainer.get_optimizer_cls_and_kwargs gives for the same name."""
    from transformers import Trainer, TrainingArguments

    names = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "rmsprop", "adagrad"]
    if importlib.util.find_spec("bitsandbytes"):
        names += ["paged_adamw_8bit", "adamw_bnb_8bit", "lion_8bit"]
    for name in names:
        ours = ppo.optimizer_for(load_config(PPOConfig, None, {"optim": name, "learning_rate": "0.1"}))
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, learning_rate=0.1, use_cpu=True)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        assert ours.func is cls and ours.keywords == {"weight_decay": 0.0, **kwargs}, name


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]], requires_grad=True)
    ids = torch.tensor([[2, 0]])
    logp = rl.token_logprobs(logits, ids)
    z = math.log(1 + math.e + math.e**2)
    assert torch.allclose(logp, torch.tensor([[2 - z, -math.log(3)]]))
    p = [1 / math.exp(z), math.e / math.exp(z), math.e**2 / math.exp(z)]
    ent = rl.entropy(logits.detach())
    assert torch.allclose(ent, torch.tensor([[-sum(q * math.log(q) for q in p), math.log(3)]]))
    logp.sum().backward()  # d log p_i / d l_j = [i == j] - p_j
    assert torch.allclose(logits.grad, torch.tensor([[[-p[0], -p[1], 1 - p[2]], [2 / 3, -1 / 3, -1 / 3]]]))


# ----------------------------------------------------------------------------------------------------------------
# tiny parents


def make_stage(root: Path, stage: str, base: str, seed: int, parent: str | None = None,
               finetuning_type: str = "lora") -> str:
    """A finished SFT (causal LM) or RM (sequence classification, score head saved) folder with random LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.loader import load_tokenizer
    from rlhf.manifest import finish_output, prepare_output
    from rlhf.templates import apply_template

    tok = load_tokenizer(base)
    apply_template(tok, "chatml")
    work = prepare_output(root / stage)
    torch.manual_seed(seed)
    if stage == "sft":
        model, task = AutoModelForCausalLM.from_pretrained(base), "CAUSAL_LM"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id)
        task = "SEQ_CLS"
    from rlhf.loader import DEFAULT_LORA_TARGETS

    arch = model.config.model_type
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS[arch], task_type=task,
                      init_lora_weights=False,
                      fan_in_fan_out=arch == "gpt2")
    get_peft_model(model, lora).save_pretrained(str(work))
    tok.save_pretrained(str(work))
    return str(finish_output(work, root / stage, stage=stage,
                             config={"template": "chatml", "finetuning_type": finetuning_type},
                             base_model=base, parent=parent))


def make_parents(root: Path, base: str) -> dict:
    sft = make_stage(root, "sft", base, seed=1)
    rm = make_stage(root, "rm", base, seed=2, parent=sft)
    return {"base": base, "sft": sft, "rm": rm, "root": root}


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_model_dir):
    return make_parents(tmp_path_factory.mktemp("ppo_parents"), tiny_model_dir("llama"))


def cfg_for(parents, out, **kw) -> PPOConfig:
    values = dict(sft_dir=parents["sft"], rm_dir=parents["rm"], output_dir=str(out), dataset="demo_prompts",
                  eval_dataset="demo_prompts_eval", num_samples=24, batch_size=4, mini_batch_size=2,
                  per_device_train_batch_size=1, ppo_epochs=2, max_steps=3, max_new_tokens=6, eval_samples=4,
                  save_steps=1, save_total_limit=None, sample_every=2, learning_rate=1e-3, seed=3)
    values.update(kw)
    return load_config(PPOConfig, None, values)


def build(parents, **kw):
    cfg = cfg_for(parents, "unused", **kw)
    cfg.model_name_or_path = parents["base"]
    from rlhf.loader import load_tokenizer

    return cfg, ppo.build_roles(cfg, load_tokenizer(parents["sft"]).pad_token_id)


def prompts_of(tokenizer, n=4):
    from rlhf.data import load_examples
    from rlhf.templates import encode_prompt

    rows = load_examples(["demo_prompts"], kind="prompt", num_samples=n)
    return [encode_prompt(tokenizer, r["messages"], 128) for r in rows]


def tokenizer_of(parents):
    from rlhf.loader import load_tokenizer
    from rlhf.templates import apply_template, stop_token_ids

    tok = load_tokenizer(parents["sft"])
    apply_template(tok, "chatml")
    return tok, stop_token_ids(tok)


def lora_state(model, role):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{role}." in n}


# ----------------------------------------------------------------------------------------------------------------
# one base


@pytest.mark.parametrize("value_model", ["adapter", "shared"])
def test_one_step_trains_only_policy_and_value_on_one_base(parents, value_model):
    cfg, roles = build(parents, value_model=value_model)
    model = roles.model
    # the base weights exist once: every base q_proj/v_proj/o_proj/... is one tensor, however many adapters
    base_linear = [m.base_layer.weight for n, m in model.named_modules() if hasattr(m, "base_layer")]
    assert len(base_linear) == 4  # q_proj, v_proj x 2 layers
    all_ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(all_ptrs) == len(set(all_ptrs))
    n_base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    from transformers import AutoModelForCausalLM

    assert n_base == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(parents["base"]).parameters())

    before = {r: lora_state(model, r) for r in ppo.ROLES}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    reward_head = roles.reward_head.weight.detach().clone()
    value_head = roles.value_head.weight.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = {n for n, f in flags.items() if f}
    assert trainable and all(".policy." in n or ".value." in n for n in trainable)
    if value_model == "shared":
        assert "value" not in model.peft_config

    tok, stops = tokenizer_of(parents)
    params = roles.params
    opt = torch.optim.SGD(params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    from accelerate import Accelerator

    batch, stats, _ = ppo.rollout(roles, prompts_of(tok), tok, stops, cfg, rl.KLController(0.05), rl.ScoreNormalizer(),
                                  step=1)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == ref at the start
    for r in ppo.ROLES:  # switching roles keeps requires_grad as the loader set it
        if r in model.peft_config:
            roles.use(r)
            assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    ppo.ppo_update(roles, batch, cfg, opt, sched, Accelerator(cpu=True), params)

    after = {r: lora_state(model, r) for r in ppo.ROLES}
    for r in ("ref", "reward"):
        assert after[r] and all(torch.equal(before[r][n], after[r][n]) for n in before[r]), r
    assert any(not torch.equal(before["policy"][n], after["policy"][n]) for n in before["policy"])
    if value_model == "adapter":
        assert any(not torch.equal(before["value"][n], after["value"][n]) for n in before["value"])
    assert not torch.equal(value_head, roles.value_head.weight)
    assert torch.equal(reward_head, roles.reward_head.weight)
    assert all(torch.equal(base_before[n], p) for n, p in model.named_parameters() if "lora_" not in n)


def test_saved_roles_load_back_and_a_wrong_shape_is_refused(parents, tmp_path):
    """Checkpoints save and load adapters by name through one shape-checked loader
    (rlhf.loader.load_adapter_weights)."""
    from safetensors.torch import load_file, save_file

    from rlhf.loader import AdapterError, load_adapter_weights
    from rlhf.roles import load_value, save_adapter, save_value

    _, roles = build(parents)
    save_adapter(roles.model, "policy", tmp_path / "policy")
    save_value(roles, tmp_path / "value")
    policy, head = lora_state(roles.model, "policy"), roles.value_head.weight.detach().clone()
    with torch.no_grad():
        for p in roles.params:
            p.add_(1.0)
    load_adapter_weights(roles.model, "policy", tmp_path / "policy")
    load_value(roles, tmp_path / "value")
    assert all(torch.equal(policy[n], p) for n, p in lora_state(roles.model, "policy").items())
    assert torch.equal(head, roles.value_head.weight)
    w = load_file(str(tmp_path / "policy" / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_A" in k)
    wrong = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])
    save_file({**w, key: wrong}, str(tmp_path / "policy" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="does not fit this base model: .* has shape"):
        load_adapter_weights(roles.model, "policy", tmp_path / "policy")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary (relative) and learned absolute positions
def test_logprobs_match_the_sampling_distribution(arch, parents, tiny_model_dir, tmp_path):
    """Left-padded prompts of different lengths: the log-probs PPO computes (temperature-scaled, positions from the
    attention mask) are those generate() sampled from [N-impl]."""
    if arch != "llama":
        parents = make_parents(tmp_path, tiny_model_dir(arch))
    cfg, roles = build(parents, temperature=0.7)
    tok, stops = tokenizer_of(parents)
    prompts = prompts_of(tok, 6)
    assert len({len(p) for p in prompts}) > 1
    ids, attn = left_pad(prompts, tok.pad_token_id)
    roles.use("policy")
    roles.model.eval()
    out = roles.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                               max_new_tokens=5, min_new_tokens=5, output_logits=True, return_dict_in_generate=True,
                               pad_token_id=tok.pad_token_id)
    response = out.sequences[:, ids.shape[1]:]
    sampled = torch.stack(out.logits, 1).div(0.7).log_softmax(-1).gather(-1, response[..., None])[..., 0]
    full_attn = torch.cat([attn, torch.ones_like(response)], 1)
    with torch.no_grad():
        logp = roles.policy_forward(out.sequences, full_attn, response.shape[1])[0]
    assert torch.allclose(logp, sampled, atol=1e-4)


@pytest.mark.parametrize("value_model", ["adapter", "shared"])
def test_critic_warmup_trains_the_critic_only(parents, value_model):
    from accelerate import Accelerator

    cfg, roles = build(parents, value_model=value_model, critic_warmup_steps=1)
    tok, stops = tokenizer_of(parents)
    opt = torch.optim.SGD(roles.params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batch, _, _ = ppo.rollout(roles, prompts_of(tok), tok, stops, cfg, rl.KLController(0.05), rl.ScoreNormalizer(),
                              step=1)
    policy, head = lora_state(roles.model, "policy"), roles.value_head.weight.detach().clone()
    ppo.ppo_update(roles, batch, cfg, opt, sched, Accelerator(cpu=True), roles.params, train_policy=False)
    assert all(torch.equal(policy[n], p) for n, p in lora_state(roles.model, "policy").items())
    assert not torch.equal(head, roles.value_head.weight)


def test_4bit_lora_gradients_after_generate_match_fresh_load(parents):
    """docs/known_traps.md: after a no-grad generate on a 4-bit CPU base, LoRA gradients must still be right."""
    pytest.importorskip("bitsandbytes")
    tok, stops = tokenizer_of(parents)
    prompts = prompts_of(tok)

    def policy_grads(roles, ids, attn, width):
        roles.model.zero_grad(set_to_none=True)
        roles.model.train()
        logp = roles.policy_forward(ids, attn, width)[0]
        (-(logp * torch.linspace(-1, 1, width)).sum()).backward()
        return torch.cat([p.grad.flatten() for n, p in roles.model.named_parameters()
                          if ".policy." in n and p.grad is not None])

    cfg, used = build(parents, quantization="4bit")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in used.model.modules())
    ids, attn, mask, _ = ppo.generate(used, prompts, tok, stops, cfg)  # eval-mode, no-grad forwards first
    ppo.score_responses(used, ids, attn, cfg)
    g_after = policy_grads(used, ids, attn, mask.shape[1])
    _, fresh = build(parents, quantization="4bit")
    g_fresh = policy_grads(fresh, ids, attn, mask.shape[1])
    assert g_after.numel() == g_fresh.numel() > 0
    assert g_after.norm() > 0
    assert torch.nn.functional.cosine_similarity(g_after, g_fresh, dim=0) > 0.95


# ----------------------------------------------------------------------------------------------------------------
# the stage


def test_end_to_end_folder_contract_and_resume(parents, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.loader import load_score_head
    from rlhf.manifest import read_manifest

    out = tmp_path / "ppo"
    assert ppo.run(cfg_for(parents, out)) == str(out)
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "manifest.json", "train_log.jsonl",
              "samples.jsonl", "training_curves.png", "value/adapter_config.json", "value/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    assert not Path(str(out) + ".partial").exists()
    m = read_manifest(out)
    assert m["stage"] == "ppo" and m["parent"]["stage"] == "sft" and m["config"]["rm_dir"] == parents["rm"]
    assert m["metrics"]["steps"] == 3
    assert "eval_reward_before" in m["metrics"] and "eval_task_metric_after" in m["metrics"]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "score_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("score_std", "kl", "entropy", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac",
                "approx_kl", "response_length", "eos_share", "tokens_per_s", "kl_coef"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert {json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()} == {1, 2}
    # plain peft loads the policy (folder root) and the critic (RM format)
    base = AutoModelForCausalLM.from_pretrained(parents["base"])
    PeftModel.from_pretrained(base, str(out))
    seq_cls = AutoModelForSequenceClassification.from_pretrained(parents["base"], num_labels=1)
    critic = PeftModel.from_pretrained(seq_cls, str(out / "value"))
    assert torch.equal(critic.base_model.model.score.modules_to_save["default"].weight,
                       load_score_head(str(out / "value")).weight)

    # an interrupted run: checkpoints 1 and 2 written, killed during step 3 (rows of step 3 already logged)
    work = Path(str(tmp_path / "again") + ".partial")
    shutil.copytree(out, work)
    for f in ("manifest.json", "adapter_model.safetensors", "adapter_config.json"):
        (work / f).unlink()
    shutil.rmtree(work / "checkpoints" / "checkpoint-3")
    ppo.run(cfg_for(parents, tmp_path / "again", resume=True))
    rows2 = [json.loads(line) for line in (tmp_path / "again" / "train_log.jsonl").read_text().splitlines()]
    train2 = [r for r in rows2 if "score_mean" in r]
    assert [r["step"] for r in train2] == [1, 2, 3]  # step 3 once: the killed run's rows were dropped
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "lr"):  # step 3 replays exactly
        assert train2[2][key] == pytest.approx(train[2][key], rel=1e-4, abs=1e-6), key
    from safetensors.torch import load_file

    w1 = load_file(str(out / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_run_with_an_8bit_optimizer(parents, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = ppo.run(cfg_for(parents, tmp_path / "ppo", optim="lion_8bit", max_steps=1, eval_samples=0))
    train = [r for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines()) if "score_mean" in r]
    assert len(train) == 1 and math.isfinite(train[0]["policy_loss"])


def test_nan_reward_stops_naming_the_step_and_keeps_the_checkpoint(parents, tmp_path):
    from safetensors.torch import load_file, save_file

    bad_rm = tmp_path / "rm_nan"
    shutil.copytree(parents["rm"], bad_rm)
    w = load_file(str(bad_rm / "adapter_model.safetensors"))
    w = {k: torch.full_like(v, float("nan")) if k.endswith("score.weight") else v for k, v in w.items()}
    save_file(w, str(bad_rm / "adapter_model.safetensors"))
    out = tmp_path / "ppo"
    ppo.run(cfg_for(parents, out, max_steps=1))  # a finished run with checkpoint-1 ...
    work = Path(str(tmp_path / "cont") + ".partial")
    shutil.copytree(out, work)
    (work / "manifest.json").unlink()
    # ... continued with a reward model that returns NaN
    with pytest.raises(FloatingPointError, match="at PPO step 2; stopping. The last good checkpoint is .*checkpoint-1"):
        ppo.run(cfg_for(parents, tmp_path / "cont", rm_dir=str(bad_rm), resume=True, max_steps=2, eval_samples=0))
    assert (work / "checkpoints" / "checkpoint-1" / "policy" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "cont").exists()


def test_bad_parents(parents, tmp_path, tiny_model_dir):
    with pytest.raises(StageError, match="does not exist: run rlhf sft or rlhf dpo or"):
        ppo.run(cfg_for(parents, tmp_path / "a", sft_dir=str(tmp_path / "nope")))
    with pytest.raises(StageError, match="is the output of `rlhf rm`, but rlhf ppo needs a sft/dpo/grpo/ppo folder"):
        ppo.run(cfg_for(parents, tmp_path / "b", sft_dir=parents["rm"]))
    with pytest.raises(StageError, match="is the output of `rlhf sft`, but rlhf ppo needs a rm folder"):
        ppo.run(cfg_for(parents, tmp_path / "c", rm_dir=parents["sft"]))
    from rlhf.tiny import make_tiny_model

    other = make_tiny_model(str(tmp_path / "other_base"), "llama", tokenizer=parents["base"], seed=7)
    rm_other = make_stage(tmp_path, "rm", other, seed=2)
    with pytest.raises(StageError, match="was trained on base model .*other_base"):
        ppo.run(cfg_for(parents, tmp_path / "d", rm_dir=rm_other))
    full_rm = make_stage(tmp_path / "full", "rm", parents["base"], seed=2, finetuning_type="full")
    with pytest.raises(ConfigError, match="one base as a LoRA adapter, but .* finetuning_type=full"):
        ppo.run(cfg_for(parents, tmp_path / "e", rm_dir=full_rm))
    assert not any(tmp_path.glob("*.partial"))


def test_prompts_all_too_long(parents, tmp_path):
    with pytest.raises(ConfigError, match=r"every one of the 24 prompts of dataset demo_prompts is longer than "
                                          r"max_prompt_length=5"):
        ppo.run(cfg_for(parents, tmp_path / "ppo", max_prompt_length=5))


def test_policy_eval_reports_every_number_of_the_metric_sampled_and_greedy():
    """rlhf.evaluate.policy_eval (ppo's and grpo's held-out evaluation): reward, eos share and each number of the
    registry metric (the demo's task_metric and pref_metric), for sampled and greedy replies, seeded."""
    from rlhf.evaluate import policy_eval

    class Chars:  # token id i is character chr(i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    replies = {True: ["12.", "40", "41"], False: ["12", "40", "41."]}  # sampled, greedy
    draws = []

    def generate(prompts, do_sample):
        draws.append(torch.rand(1).item())  # the same seed on every call: the same draws
        rows = [[ord(c) for c in r] + [0] * (4 - len(r)) for r in replies[do_sample]][: len(prompts)]
        ids = torch.tensor(rows)
        mask = (ids != 0).long()
        return ids, mask, mask, torch.tensor([True, True, False])[: len(prompts)]

    metas = [{"answer": "12"}, {"answer": "40"}, {"answer": "40"}]
    out = policy_eval(generate, [[1], [2], [3]], metas, Chars(), "demo_task", seed=7,
                      score=lambda ids, attn: attn.sum(1).float())
    assert out == pytest.approx({
        "eval_reward": 7 / 3, "eval_eos_share": 2 / 3, "eval_task_metric": 2 / 3, "eval_pref_metric": 1 / 3,
        "eval_reward_greedy": 7 / 3, "eval_eos_share_greedy": 2 / 3, "eval_task_metric_greedy": 2 / 3,
        "eval_pref_metric_greedy": 2 / 3})
    assert draws[0] == draws[1]
    assert policy_eval(generate, [], [], Chars(), "demo_task", seed=7) == {}
    assert "eval_reward" not in policy_eval(generate, [[1]], metas[:1], Chars(), None, seed=7)
