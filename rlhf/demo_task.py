"""The demo task: which of two numbers is larger (or smaller)?

    user:      Which is larger, 37 or 52?
    assistant: 52

Why this task. The demo must show every stage's gain on a checkable task with a
~1M-parameter model trained from scratch in about a minute on a CPU:

- Each prompt names two numbers from 10 to 99 and asks for the larger or the smaller
  (several phrasings). The answer is one of the two numbers, so it can be checked
  exactly, and the model only has to order 90 numbers and copy one of them: small
  models learn that, whereas two-digit addition needs far more data and steps.
- The pre-training corpus (``rlhf pt``) states comparisons in prose ("52 is larger
  than 37.") and counts ("After 36 comes 37."), mixed with filler sentences, but
  never in the chat format: the base model knows the domain, not how to answer.
- Held-out prompts use pairs of numbers that appear nowhere in training (not in the
  corpus, SFT, preference or PPO rows), so the metric measures a learned ordering,
  not recall.
- The natural wrong answer is the other number in the prompt, a near miss a reward
  model can only reject by doing the comparison; preference rows also use off-by-one
  and off-by-ten mistakes.
- A random pick between the two numbers scores 0.5; a sampled (temperature 1) answer
  from a lightly tuned model sits between that and 1, which leaves PPO room to gain.

Scoring rule (``score``): the response is cut at the first ``<|im_end|>``,
``<|endoftext|>`` or newline (text after the end of the answer line is ignored), then
stripped of whitespace and of one trailing full stop; it scores 1.0 only if what is
left equals the reference answer exactly ("52", " 52 ", "52." and "52\\nmore" score 1;
"52 is larger", "The answer is 52", "052" and "" score 0). The demo asks for the
number alone, so an answer in prose is wrong: that is what the base model gets wrong.
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
        raise KeyError(f"demo_task.score: the row has no 'answer' key (keys: {sorted(meta)}); demo rows keep the reference answer there")
    return 1.0 if extract_answer(response) == str(meta["answer"]).strip() else 0.0


def task_metric(rows: list[dict], responses: list[str]) -> float:
    """Share of ``responses`` that answer their row correctly (rows[i] goes with responses[i])."""
    if len(rows) != len(responses):
        raise ValueError(f"demo_task.task_metric: {len(rows)} rows but {len(responses)} responses; give one response per row")
    if not rows:
        raise ValueError("demo_task.task_metric: no rows to score")
    return sum(score(r, s) for r, s in zip(rows, responses)) / len(rows)
