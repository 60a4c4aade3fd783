"""The demo task: what number comes right after (or before) a number from 10 to 99?

    user:      What number comes after 69?
    assistant: 70

Why this task. The demo must show each stage's gain on a checkable task with a tiny model
(~0.5M parameters) pre-trained from scratch in about a minute on a CPU. Measured on the way:
two-digit comparison ("which is larger, 37 or 52?") was not learned by pre-training in that
budget (chance level), and recalled arithmetic facts (sums, times table) were learned in prose
but SFT on the chat template did not carry them over to held-out questions (~0.1-0.3).
Successor/predecessor works: every counting run in the corpus teaches it, and with numbers
cut into digits the rule (keep the tens digit, step the units, carry at 9/0) transfers to
questions the later stages never saw.

- Questions: "What number comes after N?", "What is one less than N?", ... (8 phrasings,
  rlhf/datasets_registry/make_demo_data.py). The answer is N + 1 or N - 1.
- The pre-training corpus counts through every number and states every fact in prose
  ("After 37 comes 38.") and, for the SFT facts only, in quiz layouts ("Q: ... A: 38.") -
  never in the chat template, so the base model answers in the wrong layout ("- 38.",
  "Student: 38.") or not at all: its metric under chatml is ~0.
- Facts split three ways: SFT facts, RL facts (PPO prompts) and held-out facts (*_eval).
  LoRA SFT reaches ~0.85-0.92 on held-out facts (greedy; ~0.83-0.90 sampled at temperature
  1). Its misses are mostly the carries (69 -> 60, 70 -> 79), where it puts < 2% on the
  right answer; the RL prompts (0.86) leave PPO the same kind of room.
- Rejected answers in preference pairs are near misses a reward model must check against
  the question: N itself, the other direction (N - 1 for "after"), one step too far, or
  off by ten.

Scoring rule (``score``): the response is cut at the first ``<|im_end|>``, ``<|endoftext|>``
or newline (text after the answer line is ignored) and stripped of whitespace; it scores 1.0
only if what is left equals the reference answer exactly. "70", " 70 " and "70\nmore" score
1; "70.", "70 is next", "The answer is 70", "070" and "" score 0. The demo asks for the
number alone, so an answer in another layout is wrong: that is what the base model gets wrong.
"""
from __future__ import annotations

END_MARKS = ("<|im_end|>", "<|endoftext|>", "\n")


def extract_answer(response: str) -> str:
    """The answer line of ``response`` under the scoring rule above."""
    for mark in END_MARKS:
        response = response.split(mark, 1)[0]
    return response.strip()


def score(meta: dict, response: str) -> float:
    """1.0 if ``response`` answers the row ``meta`` (which has an ``answer`` key) correctly, else 0.0."""
    if "answer" not in meta:
        raise KeyError(f"demo_task.score: the row has no 'answer' key (keys: {sorted(meta)}); demo rows keep the "
                       "reference answer there")
    return 1.0 if extract_answer(response) == str(meta["answer"]).strip() else 0.0


def task_metric(rows: list[dict], responses: list[str]) -> float:
    """Share of ``responses`` that answer their row correctly (rows[i] goes with responses[i])."""
    if len(rows) != len(responses):
        raise ValueError(f"demo_task.task_metric: {len(rows)} rows but {len(responses)} responses; give one response "
                         "per row")
    if not rows:
        raise ValueError("demo_task.task_metric: no rows to score")
    return sum(score(r, s) for r, s in zip(rows, responses)) / len(rows)
