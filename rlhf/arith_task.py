"""The real-model task (configs/smollm2-135m/): add two numbers from 10 to 49, answered as an equation.

    user:      What is 34 + 36?
    assistant: 34 + 36 = 70             (preferred: the equation)
    assistant: The sum is 70.           (right, but not the preferred layout)

Why this task. SmolLM2-135M-Instruct, zero-shot, answers such questions in prose ("To add 34 and 36, you simply
add them together: ...") and, when it does write the sum, gets it wrong about a third of the time (measured on
24 held-out sums: 4 of 7 equations right, 4 of 24 answers right on their first line). SFT teaches the layout in a
few dozen steps. Its answers (datasets_registry/make_arith_data.py) come in two layouts, the equation or a
sentence, with the share depending on the phrasing, so the SFT model writes the preferred equation only about
half the time. The preference pairs prefer the correct equation over the sentence and over a near miss (off by
one or ten, a dropped carry): the reward model learns both, and PPO has something to move that the metrics
below check without the reward model.

Scoring rules. The response is cut at the first ``<|im_end|>``, ``<|endoftext|>`` or newline and stripped.
``correct`` (the task metric): the last number left is the sum, in any layout: "34 + 36 = 70", "The sum is 70."
score 1; "34 + 36 = 71", "To add 34 and 36, you add them: 34 + 36 =" score 0. ``preferred`` (pref_metric): what
is left is exactly "a + b = c" with the question's a and b and their sum c; "34+36=70", "The sum is 70." and
"70" score 0.
"""
from __future__ import annotations

import re

END_MARKS = ("<|im_end|>", "<|endoftext|>", "\n")


def answer_line(response: str) -> str:
    for mark in END_MARKS:
        response = response.split(mark, 1)[0]
    return response.strip()


def _sum(meta: dict) -> tuple[int, int, int]:
    missing = [k for k in ("a", "b", "answer") if k not in meta]
    if missing:
        raise KeyError(f"arith_task: the row has no {', '.join(missing)} (keys: {sorted(meta)}); arith rows keep a, b "
                       "and answer (datasets_registry/make_arith_data.py)")
    return int(meta["a"]), int(meta["b"]), int(meta["answer"])


def correct(meta: dict, response: str) -> bool:
    """Whether the last number on the answer line is the row's sum (any layout)."""
    numbers = re.findall(r"\d+", answer_line(response))
    return bool(numbers) and int(numbers[-1]) == _sum(meta)[2]


def preferred(meta: dict, response: str) -> bool:
    """Whether the answer line is exactly the row's equation "a + b = c"."""
    a, b, c = _sum(meta)
    return answer_line(response) == f"{a} + {b} = {c}"


def _check(rows: list[dict], responses: list[str]) -> None:
    if len(rows) != len(responses):
        raise ValueError(f"arith_task: {len(rows)} rows but {len(responses)} responses; give one response per row")
    if not rows:
        raise ValueError("arith_task: no rows to score")


def task_metric(rows: list[dict], responses: list[str]) -> float:
    """Share of ``responses`` with the right sum (rows[i] goes with responses[i])."""
    _check(rows, responses)
    return sum(correct(r, s) for r, s in zip(rows, responses)) / len(rows)


def metrics(rows: list[dict], responses: list[str]) -> dict[str, float]:
    """task_metric (right sum) and pref_metric (right sum as the exact equation)."""
    _check(rows, responses)
    return {"task_metric": task_metric(rows, responses),
            "pref_metric": sum(preferred(r, s) for r, s in zip(rows, responses)) / len(rows)}
