"""Generation from token ids: left padding, sampling with stop tokens, response masks, decoding.

One implementation for PPO's rollouts and evaluations (stages/ppo.py), the in-run task metric (rlhf/evaluate.py)
and `rlhf generate`/`chat`/`eval`. Plain arguments: a model, prompt ids, and the sampling settings; no stage config.

Shapes: prompts are lists of token ids; ``generate`` returns ``ids`` = left-padded prompt + response (B, P + R),
``attn`` its attention mask, ``mask`` (B, R) = 1 up to and including the first stop token, ``ended`` (B,) whether
a row has a stop token. Tokens after the first stop token are replaced by pad (trl's truncate_response).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad(rows: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` padded with ``pad_id`` to the longest. Left for generation (every row
    continues at the right edge), right for scoring and losses (position ids need no correction)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        attn[i, at] = 1
    return ids, attn


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad(prompts, pad_id, "left")


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): mask is 1 up to and including the first stop token (the whole row if none); ended says
    whether the row has a stop token."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.int().argmax(1), responses.shape[1] - 1)
    mask = (torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]).long()
    return mask, ended


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_token_id: int, stop_ids: list[int], max_new_tokens: int,
             do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int = 16):
    """Responses to ``prompts`` (all left-padded to one width, generated in chunks of ``batch_size``), in eval
    mode (the model's mode is restored after). Returns (ids, attn, mask, ended), see the module docstring; the
    sampling settings are ignored when ``do_sample`` is off (greedy)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
                           top_p=top_p if do_sample else None,
                           eos_token_id=list(stop_ids), pad_token_id=pad_token_id)
    q_ids, q_attn = left_pad(prompts, pad_token_id)
    chunks = []
    for i in range(0, len(prompts), batch_size):
        ids, attn = q_ids[i : i + batch_size].to(device), q_attn[i : i + batch_size].to(device)
        chunks.append(model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)[:, q_ids.shape[1] :])
    if was_training:
        model.train()
    width = max(c.shape[1] for c in chunks)
    responses = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])
    mask, ended = response_mask(responses, stop_ids)
    responses = responses.masked_fill(mask == 0, pad_token_id)
    ids = torch.cat([q_ids.to(device), responses], 1)
    attn = torch.cat([q_attn.to(device), mask], 1)
    return ids, attn, mask, ended


def decode(tokenizer, responses: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor | None = None) -> list[str]:
    """The text of each response's masked tokens (special tokens skipped); with ``ended``, a row's final stop
    token is left out too (whether or not the tokenizer counts it as special)."""
    lengths = mask.sum(1) - (ended.long() if ended is not None else 0)
    return [tokenizer.decode(r[: int(n)], skip_special_tokens=True) for r, n in zip(responses.tolist(), lengths)]


def generate_text(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
                  do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  stop_ids: list[int] | None = None) -> list[str]:
    """The decoded responses (stop token left out) to ``prompts``, greedy unless ``do_sample``. Each chunk of
    ``batch_size`` prompts is padded to its own longest (no tensor of all rows is needed). ``stop_ids``: the
    tokenizer's eos and its template's end-of-turn token unless given (rlhf.templates.stop_token_ids)."""
    if stop_ids is None:
        from rlhf.templates import stop_token_ids

        stop_ids = stop_token_ids(tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, _, mask, ended = generate(model, chunk, pad_token_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                       top_k=top_k, top_p=top_p, batch_size=len(chunk))
        out += decode(tokenizer, ids[:, -mask.shape[1] :], mask, ended)
    return out
