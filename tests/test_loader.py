"""rlhf.loader on tiny local models: quantized LoRA training, the 4-bit CPU trap, adapters, heads."""
import json
import types

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.loader import (
    AdapterSpec,
    ModelPathError,
    load_model,
    load_score_head,
    load_tokenizer,
    lora_targets,
    resolve_dtype,
    set_active_adapter,
    trainable_parameters,
    use_adapter,
)
from rlhf.tiny import ARCHS


def mcfg(path, **kw) -> ModelConfig:
    return ModelConfig(model_name_or_path=path, **{"lora_dropout": 0.0, "dtype": "float32", **kw})


def on(model, batch) -> dict:
    return {k: v.to(model.device) for k, v in batch.items()}


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def batch(llama):
    tok = load_tokenizer(llama)
    b = tok(["The cat sees the dog.", "What is 3 plus 4? The answer is 7."], return_tensors="pt", padding=True)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return dict(b)


def perturb_lora(model, seed: int) -> None:
    """LoRA B starts at zero; give every LoRA weight seeded values so A and B both get gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_grads(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(**on(model, batch)).loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert named, "no trainable LoRA parameters"
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for _, p in named]).cpu()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def scalar_values(model, batch) -> torch.Tensor:
    b = on(model, batch)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().cpu()


QUANT = [
    dict(quantization="4bit", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    dict(quantization="4bit", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    dict(quantization="8bit"),
    dict(quantization="none"),
]


@pytest.mark.parametrize("q", QUANT, ids=["4bit-nf4-dq", "4bit-fp4", "8bit", "none"])
def test_lora_grads_after_eval_and_generate_match_fresh_load(llama, batch, q, monkeypatch):
    """docs/known_traps.md: gradients after an eval no-grad forward and after generate equal a fresh load's.

    The CPU is made to report AVX512-BF16 (as the machines where the trap was seen do), so bitsandbytes
    turns its weight repacking on and only the loader's fix keeps the gradients right."""
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)
    cfg = mcfg(llama, **q)
    fresh = load_model(cfg, adapters=[AdapterSpec("default", trainable=True)])
    assert fresh.training
    perturb_lora(fresh, seed=1)
    g_fresh = lora_grads(fresh, batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in fresh.named_parameters() if "lora_" in n), "a LoRA weight got no gradient"

    model = load_model(cfg, adapters=[AdapterSpec("default", trainable=True)])
    perturb_lora(model, seed=1)
    if q["quantization"] == "4bit":
        import bitsandbytes as bnb

        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    model.eval()
    scalar_values(model, batch)
    model.train()
    assert cosine(lora_grads(model, batch), g_fresh) > 0.95
    model.eval()
    model.generate(input_ids=on(model, batch)["input_ids"][:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.train()
    assert cosine(lora_grads(model, batch), g_fresh) > 0.95


@pytest.mark.skipif(torch.cuda.is_available(), reason="the repacking trap is on CPU only")
def test_trap_check_fails_when_4bit_repacking_is_on(llama, batch):
    """Without the loader's fix (flag forced back on), the same check sees the wrong gradients:
    bitsandbytes repacks the weights at the eval forward and backprops through gemv_4bit."""
    import bitsandbytes as bnb

    cfg = mcfg(llama, quantization="4bit")
    model = load_model(cfg, adapters=[AdapterSpec("default", trainable=True)])
    perturb_lora(model, seed=1)
    g_fresh = lora_grads(model, batch)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on CPUs with AVX512-BF16
    model.eval()
    scalar_values(model, batch)
    model.train()
    with pytest.warns(UserWarning, match="gemv_4bit"):
        g = lora_grads(model, batch)
    assert cosine(g, g_fresh) < 0.95


def test_gradient_checkpointing_keeps_gradients(llama, batch):
    for q in ("4bit", "none"):
        ref = load_model(mcfg(llama, quantization=q), adapters=[AdapterSpec("default", trainable=True)])
        perturb_lora(ref, seed=2)
        model = load_model(mcfg(llama, quantization=q, gradient_checkpointing=True),
                           adapters=[AdapterSpec("default", trainable=True)])
        perturb_lora(model, seed=2)
        assert model.config.use_cache is False and model.base_model.model.is_gradient_checkpointing
        assert cosine(lora_grads(model, batch), lora_grads(ref, batch)) > 0.999


@pytest.mark.parametrize("arch", ARCHS)
def test_default_lora_targets_per_architecture(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = load_model(mcfg(path), adapters=[AdapterSpec("default", trainable=True)])
    expected = {"llama": "q_proj", "mistral": "q_proj", "qwen2": "q_proj", "gpt2": "c_attn",
                "gpt_neox": "query_key_value", "bloom": "query_key_value"}[arch]
    lora_layers = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert expected in lora_layers
    assert lora_layers == set(lora_targets(model.base_model.model, ["auto"]))
    perturb_lora(model, seed=0)
    tok = load_tokenizer(path)
    b = tok(["The old dog reads the book."], return_tensors="pt")
    g = lora_grads(model, {**b, "labels": b["input_ids"]})
    assert g.abs().sum() > 0


def test_lora_targets_rules(llama):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama)
    assert lora_targets(base, ["all-linear"]) == "all-linear"
    assert lora_targets(base, ["q_proj", "mlp.down_proj"]) == ["q_proj", "mlp.down_proj"]
    assert lora_targets(types.SimpleNamespace(model_type="made_up_arch"), ["auto"]) == "all-linear"
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*q_proj"):
        lora_targets(base, ["qproj"])
    model = load_model(mcfg(llama, lora_target=["q_proj", "k_proj", "o_proj"]),
                       adapters=[AdapterSpec("default", trainable=True)])
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "o_proj"}
    with pytest.raises(ValueError, match="matches no linear layer"):
        load_model(mcfg(llama, lora_target=["c_attn"]), adapters=[AdapterSpec("default", trainable=True)])


def save_adapter(base, folder, seed, **cfg_kw) -> str:
    model = load_model(mcfg(base, **cfg_kw), adapters=[AdapterSpec("default", trainable=True)])
    perturb_lora(model, seed)
    model.save_pretrained(str(folder))
    return str(folder)


def test_causal_lm_adapter_reloads_with_plain_peft(llama, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(mcfg(llama), adapters=[AdapterSpec("default", trainable=True)])
    perturb_lora(model, seed=3)
    model.save_pretrained(str(tmp_path / "sft"))
    model.eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), str(tmp_path / "sft")).eval()
    assert torch.allclose(scalar_values(model, batch), scalar_values(plain, batch), atol=1e-5)
    again = load_model(mcfg(llama), adapters=[AdapterSpec("sft", str(tmp_path / "sft"))], for_training=False)
    assert not again.training and trainable_parameters(again)[0] == 0
    assert torch.allclose(scalar_values(again, batch), scalar_values(plain, batch), atol=1e-5)


def test_named_adapters_share_one_base(llama, batch, tmp_path):
    from safetensors.torch import load_file

    a = save_adapter(llama, tmp_path / "a", seed=4)
    b = save_adapter(llama, tmp_path / "b", seed=5)
    cfg = mcfg(llama, quantization="4bit")
    model = load_model(cfg, adapters=[AdapterSpec("policy", a, trainable=True), AdapterSpec("ref", b)])
    assert model.active_adapter == "policy"
    params = dict(model.named_parameters())
    policy = {n: p for n, p in params.items() if ".policy." in n}
    ref = {n: p for n, p in params.items() if ".ref." in n}
    base = {n: p for n, p in params.items() if n not in policy and n not in ref}
    assert policy and ref and len(policy) == len(ref)
    assert all(p.requires_grad for p in policy.values())
    assert not any(p.requires_grad for p in ref.values()) and not any(p.requires_grad for p in base.values())
    # the saved weights were loaded into the right adapter
    saved_b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for k, v in saved_b.items():
        assert torch.equal(params[k.replace(".weight", ".ref.weight")].detach().cpu(), v)
    # one base: total = base + 2 adapters, and the base layers are shared, not copied
    lora_one = sum(p.numel() for p in policy.values())
    plain_total = trainable_parameters(load_model(cfg))[1]
    assert trainable_parameters(model)[1] == plain_total + 2 * lora_one
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(q_proj.lora_A.keys()) == {"policy", "ref"}

    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**on(model, batch)).loss.backward()
    opt.step()
    assert all(not torch.equal(params[n].detach(), before[n]) for n in policy)
    assert all(torch.equal(params[n].detach(), before[n]) for n in {**ref, **base})

    # switching adapters changes the output and keeps who trains (peft's set_adapter alone would flip it)
    with use_adapter(model, "ref"):
        assert model.active_adapter == "ref"
        ref_logits = scalar_values(model, batch)
        assert not any(p.requires_grad for p in ref.values())
    assert model.active_adapter == "policy" and all(p.requires_grad for p in policy.values())
    assert not torch.allclose(ref_logits, scalar_values(model, batch))
    set_active_adapter(model, "ref")
    assert model.active_adapter == "ref" and all(p.requires_grad for p in policy.values())


def test_score_head_saves_and_reloads_with_plain_peft(llama, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = load_model(mcfg(llama), head="score", adapters=[AdapterSpec("default", trainable=True)])
    assert model.config.pad_token_id == load_tokenizer(llama).pad_token_id
    perturb_lora(model, seed=6)
    score_copy = model.base_model.model.score.modules_to_save["default"]
    assert score_copy.weight.requires_grad
    with torch.no_grad():
        score_copy.weight.add_(1.0)  # a trained head differs from the base's random one
    model.save_pretrained(str(tmp_path / "rm"))
    saved_cfg = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert "score" in saved_cfg["modules_to_save"] and saved_cfg["task_type"] == "SEQ_CLS"

    model.eval()
    plain_base = AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1, pad_token_id=0)
    plain = PeftModel.from_pretrained(plain_base, str(tmp_path / "rm")).eval()
    scores = scalar_values(model, batch)
    assert scores.shape == (2, 1)
    assert torch.allclose(scores, scalar_values(plain, batch), atol=1e-5)
    head = load_score_head(str(tmp_path / "rm"))
    assert torch.equal(head.weight, score_copy.weight.detach().cpu())
    again = load_model(mcfg(llama), head="score", adapters=[AdapterSpec("reward", str(tmp_path / "rm"))],
                       for_training=False)
    assert torch.allclose(scalar_values(again, batch), scores, atol=1e-5)


def test_rm_starts_from_sft_adapter_and_ppo_reads_it_on_the_lm(llama, batch, tmp_path):
    from safetensors.torch import load_file

    sft = save_adapter(llama, tmp_path / "sft", seed=7)
    cfg = mcfg(llama, quantization="4bit")
    rm = load_model(cfg, head="score",
                    adapters=[AdapterSpec("default", sft, trainable=True, modules_to_save=["score"])])
    sft_w = load_file(str(tmp_path / "sft" / "adapter_model.safetensors"))
    params = dict(rm.named_parameters())
    for k, v in sft_w.items():
        assert torch.equal(params[k.replace(".weight", ".default.weight")].detach().cpu(), v)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert any("score.modules_to_save.default" in n for n in trainable) and any("lora_A" in n for n in trainable)
    with torch.no_grad():
        rm.base_model.model.score.modules_to_save["default"].weight.mul_(2.0)
    rm.save_pretrained(str(tmp_path / "rm"))

    ppo = load_model(cfg,
                     adapters=[AdapterSpec("policy", sft, trainable=True), AdapterSpec("reward", str(tmp_path / "rm"))])
    reward = {n: p for n, p in ppo.named_parameters() if ".reward." in n}
    assert reward and all("lora_" in n for n in reward) and not any(p.requires_grad for p in reward.values())
    head = load_score_head(str(tmp_path / "rm"))
    assert torch.equal(head.weight, rm.base_model.model.score.modules_to_save["default"].weight.detach().cpu())
    with pytest.raises(ValueError, match="no score head"):
        load_score_head(sft)


def test_full_and_freeze_finetuning(tiny_model_dir, llama):
    full = load_model(mcfg(llama, finetuning_type="full"))
    assert all(p.requires_grad for p in full.parameters()) and full.training

    frozen = load_model(mcfg(llama, finetuning_type="freeze", freeze_trainable_layers=1))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
    assert "model.norm.weight" in trainable and "model.layers.1.mlp.up_proj.weight" in trainable

    gpt2 = load_model(mcfg(tiny_model_dir("gpt2"), finetuning_type="freeze", freeze_trainable_layers=1), head="score")
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f.", "score.")) for n in trainable)
    assert {"transformer.ln_f.weight", "score.weight"} <= trainable

    with pytest.raises(ValueError, match="quantization: none"):
        load_model(mcfg(llama, finetuning_type="full", quantization="4bit"))
    with pytest.raises(ValueError, match="finetuning_type: lora"):
        load_model(mcfg(llama, finetuning_type="full"), adapters=[AdapterSpec("default", trainable=True)])


def test_missing_paths_are_clear_errors(llama, tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelPathError, match=r"no_such_model does not exist.*rlhf pt"):
        load_model(mcfg(missing))
    with pytest.raises(ModelPathError, match="no_such_model"):
        load_tokenizer(missing)
    with pytest.raises(ModelPathError, match=r"adapter folder .*nothing does not exist"):
        load_model(mcfg(llama), adapters=[AdapterSpec("ref", str(tmp_path / "nothing"))])
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelPathError, match=r"half has no adapter weights \(adapter_model.safetensors"):
        load_model(mcfg(llama), adapters=[AdapterSpec("ref", str(half))])
    sft = save_adapter(llama, tmp_path / "sft", seed=0)
    with pytest.raises(ModelPathError, match="is a LoRA adapter folder, not a base model"):
        load_model(mcfg(sft))


def test_adapter_from_another_base_is_refused(tiny_model_dir, llama, tmp_path):
    other = save_adapter(tiny_model_dir("gpt2"), tmp_path / "gpt2_sft", seed=0)
    with pytest.raises(ValueError):
        load_model(mcfg(llama), adapters=[AdapterSpec("x", other)])


def test_dtype_and_tokenizer(tmp_path, tiny_tokenizer_dir):
    assert resolve_dtype("auto") == (torch.float32 if not torch.cuda.is_available() else resolve_dtype("auto"))
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="float64x"):
        resolve_dtype("float64x")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
