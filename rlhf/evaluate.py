"""Generation and the checkable task metric on held-out prompts (used by stages and tests)."""
from __future__ import annotations

import importlib

import torch

from rlhf.data import DataError

# registry `metric:` name -> module with `task_metric(rows, responses) -> float`
METRICS = {"demo_task": "rlhf.demo_task"}


def metric_fn(name: str | None):
    if not name:
        return None
    if name not in METRICS:
        raise DataError(f"unknown metric '{name}' in the registry; known: {', '.join(METRICS)}")
    return importlib.import_module(METRICS[name]).task_metric


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """Left-padded batched generation; returns the decoded responses (stop tokens removed)."""
    from rlhf.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        )
        for row in gen[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def task_metric(model, tokenizer, examples: list[dict], metric: str, *, max_prompt_length: int,
                max_new_tokens: int, **gen_kw) -> float | None:
    """Mean checkable score of the model's greedy (default) answers to ``examples``' prompts."""
    from rlhf.templates import encode_prompt

    fn = metric_fn(metric)
    if fn is None or not examples:
        return None
    kept = [(e, p) for e in examples if (p := encode_prompt(tokenizer, prompt_messages(e), max_prompt_length))]
    responses = generate(model, tokenizer, [p for _, p in kept], max_new_tokens=max_new_tokens, **gen_kw)
    return float(fn([e["meta"] for e, _ in kept], responses))


def prompt_messages(example: dict) -> list[dict]:
    """The prompt part of an example: everything before its last assistant turn."""
    msgs = example["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
