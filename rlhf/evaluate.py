"""The checkable task metric on held-out prompts (used by stages and tests); generation is rlhf/generation.py."""
from __future__ import annotations

import importlib

from rlhf.data import DataError
from rlhf.generation import generate_text

generate = generate_text  # the name rlhf/use.py imports, until it calls rlhf.generation itself

# registry `metric:` name -> module with `task_metric(rows, responses) -> float`
METRICS = {"demo_task": "rlhf.demo_task"}


def metric_fn(name: str | None):
    if not name:
        return None
    if name not in METRICS:
        raise DataError(f"unknown metric '{name}' in the registry; known: {', '.join(METRICS)}")
    return importlib.import_module(METRICS[name]).task_metric


def task_metric(model, tokenizer, examples: list[dict], metric: str, *, max_prompt_length: int,
                max_new_tokens: int, **gen_kw) -> float | None:
    """Mean checkable score of the model's greedy (default) answers to ``examples``' prompts."""
    from rlhf.templates import encode_prompt

    fn = metric_fn(metric)
    if fn is None or not examples:
        return None
    kept = [(e, p) for e in examples if (p := encode_prompt(tokenizer, prompt_messages(e), max_prompt_length))]
    responses = generate_text(model, tokenizer, [p for _, p in kept], max_new_tokens=max_new_tokens, **gen_kw)
    return float(fn([e["meta"] for e, _ in kept], responses))


def prompt_messages(example: dict) -> list[dict]:
    """The prompt part of an example: everything before its last assistant turn."""
    msgs = example["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
