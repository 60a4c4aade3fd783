"""The demo task: what number comes right after (or before) a number from 10 to 99, answered in the layout users
prefer.

    user:      What number comes after 69?
    assistant: 70       (preferred: the number alone, as the question asks)
    assistant: 70.      (right, but not the preferred layout)

Why this task. The demo must show each stage's gain on a checkable task with a tiny model
(~0.5M parameters) pre-trained from scratch in about a minute on a CPU. Measured on the way:
two-digit comparison ("which is larger, 37 or 52?") was not learned by pre-training in that
budget (chance level), and recalled arithmetic facts (sums, times table) were learned in prose
but SFT on the chat template did not carry them over to held-out questions (~0.1-0.3).
Successor/predecessor works: every counting run in the corpus teaches it, and with numbers
cut into digits the rule (keep the tens digit, step the units, carry at 9/0) transfers to
questions the later stages never saw.

What each stage has to do (datasets_registry/make_demo_data.py writes the data):
- Questions: "What number comes after N?", "What is one less than N?", ... (8 phrasings). The
  answer is N + 1 or N - 1.
- The pre-training corpus counts through every number and states every fact in prose and, for
  the SFT facts only, in quiz layouts - never in the chat template, so the base model answers in
  the wrong layout ("- 38.", "Student: 38.") or not at all: its metrics under chatml are ~0.
- The SFT answers come in two layouts, as if from two annotators: the number alone, or the
  number with a full stop. Which one leans on the question: "after" questions are answered with
  the number alone 4 times in 5, "before" questions 1 time in 5. So the SFT model answers right
  in either layout (task metric) but, greedy, in the preferred one only on about half the
  prompts (the "after" ones), and it samples the other layout a fifth of the time: PPO has
  something to move, and the samples to move it with. Measured on the way: layouts that put
  words before the number ("The answer is 70.") left the number-alone answers unlearned in the
  SFT budget (its first digit spread over all ten, so greedy took the words every time), and
  words after it ("70 is the answer.") left the reward model unable to check the number
  (held-out accuracy 0.5-0.8). With the full stop the number comes first in both layouts and sits
  next to the token the reward model reads.
- The preference pairs prefer the number alone (over the same number with a full stop), and a
  right answer over a near miss in either layout (N itself, the other direction, one step too
  far, off by ten). The reward model has to learn both: the layout, and checking the number
  against the question.
- PPO samples on questions SFT never taught; it has to move the policy to the preferred layout
  for every phrasing without losing correctness. Facts split three ways: SFT facts, RL facts
  (PPO prompts) and held-out facts (every *_eval file).

Scoring rules. The response is cut at the first ``<|im_end|>``, ``<|endoftext|>`` or newline
(text after the answer line is ignored) and stripped of whitespace. ``score`` (the task metric,
correctness) is 1.0 if what is left is the reference answer in either layout, exactly: "70",
" 70 ", "70\\nmore" and "70." score 1; "70..", "70 .", "70 is next", "The answer is 70", "070" and ""
score 0. ``preferred`` (the preference metric) is 1.0 only for the right number alone.
``metrics`` gives both means: ``task_metric`` and ``pref_metric``.
"""
from __future__ import annotations

END_MARKS = ("<|im_end|>", "<|endoftext|>", "\n")
FULL_STOP = "{}."  # the layout that is right but not preferred


def extract_answer(response: str) -> str:
    """The answer line of ``response`` under the scoring rules above."""
    for mark in END_MARKS:
        response = response.split(mark, 1)[0]
    return response.strip()


def _reference(meta: dict) -> str:
    if "answer" not in meta:
        raise KeyError(f"demo_task: the row has no 'answer' key (keys: {sorted(meta)}); demo rows keep the "
                       "reference answer there")
    return str(meta["answer"]).strip()


def score(meta: dict, response: str) -> float:
    """1.0 if ``response`` answers the row ``meta`` (which has an ``answer`` key) correctly in either layout."""
    reference = _reference(meta)
    return 1.0 if extract_answer(response) in (reference, FULL_STOP.format(reference)) else 0.0


def preferred(meta: dict, response: str) -> float:
    """1.0 if ``response`` is the right answer in the preferred layout (the number alone)."""
    return 1.0 if extract_answer(response) == _reference(meta) else 0.0


def _mean(fn, rows: list[dict], responses: list[str]) -> float:
    if len(rows) != len(responses):
        raise ValueError(f"demo_task: {len(rows)} rows but {len(responses)} responses; give one response per row")
    if not rows:
        raise ValueError("demo_task: no rows to score")
    return sum(fn(r, s) for r, s in zip(rows, responses)) / len(rows)


def task_metric(rows: list[dict], responses: list[str]) -> float:
    """Share of ``responses`` that answer their row correctly (rows[i] goes with responses[i])."""
    return _mean(score, rows, responses)


def metrics(rows: list[dict], responses: list[str]) -> dict[str, float]:
    """The task metric (correctness) and the preference metric (right and in the preferred layout)."""
    return {"task_metric": task_metric(rows, responses), "pref_metric": _mean(preferred, rows, responses)}
