"""Stability options for full-parameter training, applied to a loaded model (both off by default).

- ``use_fp32_attention(model)``: attention scores, softmax and the weighted sum in fp32, whatever the model's dtype
  (GLM-130B, Zeng et al. 2022, arXiv:2210.02414, sec. 2.3: a 16-bit softmax over large scores overflows or loses
  precision; fused kernels such as flash attention already accumulate in fp32, the eager paths of some
  architectures, e.g. GPT-2's, do not). Registered as transformers attention implementation ``rlhf_fp32``.
- ``shrink_embedding_gradient(model, alpha)``: the embedding output becomes ``emb * alpha + emb.detach() *
  (1 - alpha)`` -- the same value, with the embedding layer's gradient multiplied by ``alpha`` (GLM-130B's
  embedding gradient shrink, alpha = 0.1: the embedding gradients are the ones that spike).

``apply_stability(model, cfg)`` applies whichever the config asks for (``attention_softmax_fp32``,
``embedding_gradient_scale``); the loader calls it once after loading.
"""
from __future__ import annotations

import logging

import torch

from rlhf.config import ConfigError

log = logging.getLogger("rlhf")

FP32_ATTENTION = "rlhf_fp32"
FP32_SOFTMAX_ALREADY = {"bloom"}  # its own attention upcasts the softmax (and does not use AttentionInterface)


def fp32_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                           **kwargs):
    """transformers' eager attention, computed in fp32 and returned in the query's dtype.

    query: (batch, heads, q_len, head_dim); key/value: (batch, kv_heads, k_len, head_dim) -> ((batch, q_len, heads,
    head_dim), probabilities).
    """
    dtype = query.dtype
    q, k, v = query.float(), key.float(), value.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves several query heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : k.shape[-2]], torch.finfo(torch.float32).min)
        else:
            scores = scores + attention_mask[..., : k.shape[-2]].float()
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, v).to(dtype).transpose(1, 2).contiguous()
    return out, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(FP32_ATTENTION, fp32_attention_forward)
    # an additive float mask, as eager attention takes
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_ATTENTION, eager_mask)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_fp32_attention(model) -> None:
    """Route every attention layer of ``model`` through ``fp32_attention_forward``."""
    _register()
    base = _base(model)
    before = base.config._attn_implementation
    if getattr(base.config, "model_type", "") in FP32_SOFTMAX_ALREADY:
        log.info("attention_softmax_fp32: %s computes its attention softmax in fp32 already", base.config.model_type)
        return
    base.set_attn_implementation(FP32_ATTENTION)
    if base.config._attn_implementation != FP32_ATTENTION:
        raise ConfigError(f"attention_softmax_fp32: {type(base).__name__} does not route its attention through "
                          "transformers' "
                         f"AttentionInterface, so its softmax cannot be moved to fp32 (it stays '{before}'); "
                         f"set attention_softmax_fp32: false for this architecture")
    log.info("attention in fp32 (was %s)", before)


def shrink_embedding_gradient(model, alpha: float):
    """Scale the input embedding's gradient by ``alpha`` (forward values unchanged); returns the hook handle."""
    if not 0 < alpha <= 1:
        raise ConfigError(f"embedding_gradient_scale must be in (0, 1] (1 is off), got {alpha}")
    emb = model.get_input_embeddings()
    if not any(p.requires_grad for p in emb.parameters()):
        log.warning("embedding_gradient_scale=%s: the embedding layer is frozen (LoRA?), so there is no gradient to "
                    "shrink", alpha)

    def hook(module, inputs, out):
        return out * alpha + out.detach() * (1 - alpha)

    return emb.register_forward_hook(hook)


def apply_stability(model, cfg) -> None:
    """Apply the stability options ``cfg`` asks for (fields ``attention_softmax_fp32`` and ``embedding_gradient_scale``;
    missing fields mean off)."""
    if getattr(cfg, "attention_softmax_fp32", False):
        use_fp32_attention(model)
    scale = getattr(cfg, "embedding_gradient_scale", 1.0)
    if scale is not None and scale != 1.0:
        shrink_embedding_gradient(model, scale)
