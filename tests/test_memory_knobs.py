"""The memory knobs reach the model and the trainer through the SFT stage, and the stability options
(rlhf/stability.py) do what they claim.

Each SFT run trains a tiny model for 2 steps; a spy (the real function, called through) keeps the model the loader
built and the trainer that trained it, so the test reads the settings off the objects that ran.
"""
import json
from pathlib import Path

import pytest
import torch

from rlhf import stability
from rlhf.config import ModelConfig, load_config


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rows = [{"instruction": f"Say the number after {i}.", "input": "",
             "output": f"It is {i + 1}, the number after {i}."}
            for i in range(10, 34)]
    path = tmp_path_factory.mktemp("knobs") / "count.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), len(rows)


def run_sft(monkeypatch, tmp_path, base, data, **keys):
    """sft.run with ``keys``; returns (model the loader built, trainer that trained it)."""
    import transformers

    import rlhf.loader
    from rlhf.stages import sft

    seen = {}
    real_load, real_train = rlhf.loader.load_model, transformers.Trainer.train

    def load_spy(*a, **kw):
        seen["model"] = real_load(*a, **kw)
        return seen["model"]

    def train_spy(self, *a, **kw):
        seen["trainer"] = self
        return real_train(self, *a, **kw)

    monkeypatch.setattr(rlhf.loader, "load_model", load_spy)
    monkeypatch.setattr(transformers.Trainer, "train", train_spy)
    values = dict(model_name_or_path=base, dataset=[data], output_dir=str(tmp_path / "out"), max_steps=2,
                  logging_steps=1,
                  per_device_train_batch_size=4, save_steps=100, task_eval_samples=0, max_length=48, learning_rate=1e-3)
    values.update(keys)
    sft.run(load_config(sft.SFTConfig, None, values))
    return seen["model"], seen["trainer"]


def _layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def _checkpoint_kwargs(model):
    fns = [m._gradient_checkpointing_func for m in model.modules()
           if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    return [getattr(f, "keywords", {}) for f in fns]


def _optimizer(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate wraps it


def test_qlora_knobs_reach_the_model(monkeypatch, tmp_path, tiny_model_dir, sft_data):
    import bitsandbytes as bnb

    data, _ = sft_data
    model, trainer = run_sft(monkeypatch, tmp_path, tiny_model_dir("llama"), data, quantization="4bit",
                             bnb_4bit_quant_type="fp4",
                             bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype="bfloat16",
                             gradient_checkpointing=True,
                             optim="adamw_bnb_8bit", gradient_accumulation_steps=2, attn_implementation="eager")
    layers = _layers(model, bnb.nn.Linear4bit)
    assert layers and all(m.weight.quant_type == "fp4" for m in layers)
    assert not any(m.weight.quant_state.nested for m in layers)  # no double quantization
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    kw = _checkpoint_kwargs(model)
    assert kw and all(k.get("use_reentrant") is False for k in kw)  # non-reentrant checkpointing on every block
    # bitsandbytes' AdamW with 8-bit states (tensors of 4096+ values; these tiny ones stay 32-bit)
    opt = _optimizer(trainer)
    assert isinstance(opt, bnb.optim.AdamW) and opt.args.optim_bits == 8 and not opt.is_paged
    assert trainer.args.gradient_accumulation_steps == 2 and trainer.state.global_step == 2
    assert model.config._attn_implementation == "eager"


def test_8bit_packing_bf16_knobs_reach_the_model(monkeypatch, tmp_path, tiny_model_dir, sft_data):
    import bitsandbytes as bnb

    data, n_rows = sft_data
    model, trainer = run_sft(monkeypatch, tmp_path, tiny_model_dir("llama"), data, quantization="8bit", packing=True,
                             bf16=True, optim="paged_adamw_8bit", max_length=128)
    assert _layers(model, bnb.nn.Linear8bitLt)
    opt = _optimizer(trainer)
    assert isinstance(opt, bnb.optim.AdamW) and opt.args.optim_bits == 8 and opt.is_paged
    assert trainer.accelerator.mixed_precision == "bf16"
    rows = trainer.train_dataset
    assert len(rows) < n_rows  # several examples share a sequence
    assert max(len(r["input_ids"]) for r in rows) <= 128 and any(len(r["seq_lengths"]) > 1 for r in rows)


def test_dtype_and_plain_optimizer_knobs(monkeypatch, tmp_path, tiny_model_dir, sft_data):
    import bitsandbytes as bnb

    data, _ = sft_data
    model, trainer = run_sft(monkeypatch, tmp_path, tiny_model_dir("qwen2"), data, dtype="bfloat16",
                             optim="paged_adamw_32bit", max_length=48)
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    opt = _optimizer(trainer)
    assert isinstance(opt, bnb.optim.AdamW) and opt.args.optim_bits == 32 and opt.is_paged
    # max_length truncates (the examples have 54 tokens)
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) == 48


@pytest.mark.skipif(not {"attention_softmax_fp32", "embedding_gradient_scale", "gradient_checkpointing_reentrant"}
                    <= set(ModelConfig.__dataclass_fields__),
                    reason="config fields not wired yet: attention_softmax_fp32, embedding_gradient_scale, "
                           "gradient_checkpointing_reentrant (ModelConfig) -> rlhf.stability.apply_stability in the "
                           "loader")
def test_stability_knobs_reach_the_model_through_sft(monkeypatch, tmp_path, tiny_model_dir, sft_data):
    data, _ = sft_data
    model, trainer = run_sft(monkeypatch, tmp_path, tiny_model_dir("llama"), data, finetuning_type="full",
                             attention_softmax_fp32=True, embedding_gradient_scale=0.1, gradient_checkpointing=True,
                             gradient_checkpointing_reentrant=True)
    assert model.config._attn_implementation == stability.FP32_ATTENTION
    assert model.get_input_embeddings()._forward_hooks  # the gradient shrink
    kw = _checkpoint_kwargs(model)
    assert kw and all(k.get("use_reentrant") is True for k in kw)
    log = [json.loads(line) for line in Path(tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in log if "loss" in r)  # finite losses, no NaN


# ---------------------------------------------------------------------------------------------------------------
# the stability options themselves


def _tiny(arch, **kw):
    from transformers import AutoModelForCausalLM

    from rlhf.tiny import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=512, **kw), attn_implementation="eager")


@pytest.mark.parametrize("arch,kw", [("llama", {"num_key_value_heads": 2}), ("gpt2", {})])
def test_fp32_attention_is_the_same_function_in_fp32(arch, kw):
    """In fp32 the option changes nothing (masking, left padding and grouped-query heads as the eager path)."""
    model = _tiny(arch, **kw).eval()
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        stability.use_fp32_attention(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == stability.FP32_ATTENTION
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fp32_attention_softmax_is_more_exact_in_bf16():
    """GPT-2's eager attention takes its softmax in the model's dtype; ours in fp32: error vs a float64 reference."""
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, dtype=torch.bfloat16) * 4 for _ in range(3))  # large scores
    module = torch.nn.Module().eval()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1) @ v.double()
    err_bf16 = (eager_attention_forward(module, q, k, v, None)[0].double().transpose(1, 2) - ref).abs().max()
    out, _ = stability.fp32_attention_forward(module, q, k, v, None)
    err_fp32 = (out.double().transpose(1, 2) - ref).abs().max()
    assert out.dtype == torch.bfloat16
    assert err_fp32 < err_bf16 / 2, (err_fp32, err_bf16)


def test_embedding_gradient_shrink():
    model = _tiny("llama")
    ids = torch.randint(0, 500, (2, 12))

    def grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, before = grads()
    handle = stability.shrink_embedding_gradient(model, 0.1)
    logits2, after = grads()
    torch.testing.assert_close(logits2, logits)  # the forward is unchanged
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(after[emb], 0.1 * before[emb])
    for n in before:
        if n != emb:
            torch.testing.assert_close(after[n], before[n])
    handle.remove()
    with pytest.raises(ValueError, match=r"embedding_gradient_scale must be in \(0, 1\]"):
        stability.shrink_embedding_gradient(model, 0)


def test_apply_stability_reads_the_config_and_refuses_what_it_cannot_do():
    class Cfg:
        attention_softmax_fp32 = True
        embedding_gradient_scale = 0.5

    model = _tiny("llama")
    stability.apply_stability(model, Cfg())
    assert model.config._attn_implementation == stability.FP32_ATTENTION and model.get_input_embeddings()._forward_hooks
    plain = _tiny("llama")
    stability.apply_stability(plain, ModelConfig())  # defaults (or fields not there yet): nothing changes
    assert plain.config._attn_implementation == "eager" and not plain.get_input_embeddings()._forward_hooks
    bloom = _tiny("bloom")
    stability.use_fp32_attention(bloom)  # its own softmax is fp32 already: left as it is
    assert bloom.config._attn_implementation == "eager"
