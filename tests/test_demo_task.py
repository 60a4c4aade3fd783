"""The demo task: scoring rules, and the shipped demo data (deterministic, held-out facts kept apart)."""
import json
import re
from pathlib import Path

import pytest

from rlhf.datasets_registry import make_demo_data as mdd
from rlhf.demo_task import score, task_metric

DATA = Path(mdd.__file__).parent / "data"
TASK_FILES = ["demo_sft", "demo_sft_eval", "demo_pref", "demo_pref_eval", "demo_prompts", "demo_prompts_eval"]


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("response, expected", [
    ("52", 1.0), (" 52 ", 1.0), ("52\n", 1.0), ("52\nand more text", 1.0), ("52<|im_end|>", 1.0),
    ("52<|endoftext|>junk", 1.0),
    ("52.", 0.0), ("52 is the answer", 0.0), ("The answer is 52", 0.0), ("052", 0.0), ("5 2", 0.0), ("53", 0.0),
    ("", 0.0),
    ("\n52", 0.0),  # the answer must be on the first line
])
def test_score_rules(response, expected):
    assert score({"answer": "52"}, response) == expected


def test_score_needs_the_answer_column():
    with pytest.raises(KeyError, match="no 'answer' key"):
        score({"instruction": "What comes after 51?"}, "52")


def test_task_metric_is_the_mean_score():
    rows = [{"answer": "12"}, {"answer": "40"}, {"answer": "99"}, {"answer": "11"}]
    assert task_metric(rows, ["12", "41", " 99", "11<|im_end|>"]) == 0.75
    with pytest.raises(ValueError, match="4 rows but 3 responses"):
        task_metric(rows, ["12", "41", "99"])
    with pytest.raises(ValueError, match="no rows"):
        task_metric([], [])


def test_make_demo_data_is_deterministic_and_the_shipped_files_are_current(tmp_path):
    assert mdd.build(0) == mdd.build(0)
    assert mdd.build(1) != mdd.build(0)
    mdd.write(tmp_path, seed=0)
    for name in ["demo_corpus", *TASK_FILES]:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), \
            f"{name}.jsonl is stale: run python -m rlhf.datasets_registry.make_demo_data"
    assert sum((DATA / f"{n}.jsonl").stat().st_size for n in ["demo_corpus", *TASK_FILES]) < 1_000_000


def _fact(row: dict) -> tuple[str, int]:
    """(op, n) of a task row, read back through the question templates."""
    for op, templates in mdd.QUESTIONS.items():
        for t in templates:
            m = re.fullmatch(re.escape(t).replace(re.escape("{n}"), r"(\d+)"), row["instruction"])
            if m:
                return op, int(m.group(1))
    raise AssertionError(f"not a demo question: {row['instruction']!r}")


def test_rows_are_right_and_held_out_facts_are_asked_by_no_training_file():
    facts = {name: {_fact(r) for r in read(name)} for name in TASK_FILES}
    for name in TASK_FILES:
        for r in read(name):
            assert r["answer"] == str(mdd.answer_of(_fact(r))), (name, r)
            if "output" in r:
                assert r["output"] == r["answer"]
            if "chosen" in r:
                assert r["chosen"] == r["answer"] and r["rejected"] != r["answer"] and r["rejected"].isdigit()
    held_out = facts["demo_sft_eval"] | facts["demo_pref_eval"] | facts["demo_prompts_eval"]
    for name in ("demo_sft", "demo_pref", "demo_prompts"):
        assert not held_out & facts[name], name
    assert not facts["demo_sft"] & facts["demo_prompts"]  # PPO samples on questions SFT never taught
    corpus = (DATA / "demo_corpus.jsonl").read_text()
    eval_questions = {r["instruction"] for n in ("demo_sft_eval", "demo_pref_eval",
                                                 "demo_prompts_eval") for r in read(n)}
    assert not [q for q in eval_questions if q in corpus]
    rl_questions = {r["instruction"] for r in read("demo_prompts")}
    assert not [q for q in rl_questions if q in corpus]


def test_rejected_answers_are_near_misses():
    for r in read("demo_pref"):
        op, n = _fact(r)
        assert int(r["rejected"]) in {n, n - mdd.OPS[op], n + 2 * mdd.OPS[op], int(r["answer"]) - 10,
                                      int(r["answer"]) + 10}
