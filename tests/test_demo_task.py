"""The demo task: scoring rules, and the shipped demo data (deterministic, held-out facts kept apart)."""
import json
import re
from pathlib import Path

import pytest

from rlhf.datasets_registry import make_demo_data as mdd
from rlhf import demo_task
from rlhf.demo_task import score, task_metric

DATA = Path(mdd.__file__).parent / "data"
TASK_FILES = ["demo_sft", "demo_sft_eval", "demo_pref", "demo_pref_eval", "demo_prompts", "demo_prompts_eval"]


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("response, right, preferred", [
    ("52", 1.0, 1.0), (" 52 ", 1.0, 1.0), ("52\n", 1.0, 1.0), ("52\nand more text", 1.0, 1.0),
    ("52<|im_end|>", 1.0, 1.0), ("52<|endoftext|>junk", 1.0, 1.0),
    ("52.", 1.0, 0.0), (" 52. <|im_end|>", 1.0, 0.0), ("52.\n9", 1.0, 0.0),
    ("53.", 0.0, 0.0), ("52..", 0.0, 0.0), ("52 .", 0.0, 0.0), ("52. Yes.", 0.0, 0.0), ("The answer is 52", 0.0, 0.0),
    ("52 is next", 0.0, 0.0), ("052", 0.0, 0.0), ("5 2", 0.0, 0.0), ("53", 0.0, 0.0),
    ("", 0.0, 0.0),
    ("\n52", 0.0, 0.0),  # the answer must be on the first line
])
def test_score_rules(response, right, preferred):
    assert score({"answer": "52"}, response) == right
    assert demo_task.preferred({"answer": "52"}, response) == preferred


def test_score_needs_the_answer_column():
    with pytest.raises(KeyError, match="no 'answer' key"):
        score({"instruction": "What comes after 51?"}, "52")


def test_task_metric_and_preference_metric_are_the_mean_scores():
    rows = [{"answer": "12"}, {"answer": "40"}, {"answer": "99"}, {"answer": "11"}]
    responses = ["12", "41", "99.", "11<|im_end|>"]
    assert task_metric(rows, responses) == 0.75
    assert demo_task.metrics(rows, responses) == {"task_metric": 0.75, "pref_metric": 0.5}
    with pytest.raises(ValueError, match="4 rows but 3 responses"):
        task_metric(rows, ["12", "41", "99"])
    with pytest.raises(ValueError, match="no rows"):
        demo_task.metrics([], [])


def test_the_registry_metric_gives_every_number():
    """The stages read a metric through rlhf.evaluate: the demo's two numbers, a module with task_metric alone one."""
    from rlhf.evaluate import metric_fn, metrics_fn

    rows, responses = [{"answer": "12"}, {"answer": "40"}], ["12.", "40"]
    assert metrics_fn("demo_task")(rows, responses) == {"task_metric": 1.0, "pref_metric": 0.5}
    assert metric_fn("demo_task")(rows, responses) == 1.0
    assert metrics_fn(None) is None and metric_fn("") is None


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
                assert score(r, r["output"]) == 1.0, (name, r)
            if "chosen" in r:
                assert score(r, r["chosen"]) == 1.0 and r["rejected"] != r["chosen"], (name, r)
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


def test_sft_answers_mix_the_layouts_by_direction():
    """Each direction leans to one layout: the SFT model follows the preferred layout (the number alone) on about
    half the prompts."""
    rows = read("demo_sft")
    for op, share in mdd.PLAIN_SHARE.items():
        mine = [r for r in rows if _fact(r)[0] == op]
        plain = sum(demo_task.preferred(r, r["output"]) for r in mine) / len(mine)
        assert abs(plain - share) < 0.05, (op, plain, share)
    assert 0.45 < sum(demo_task.preferred(r, r["output"]) for r in rows) / len(rows) < 0.55


def layout(answer: str) -> tuple[str | None, str | None]:
    """("number", "70") for "70", ("full_stop", "70") for "70.", else (None, None)."""
    if answer.isdigit():
        return "number", answer
    if answer.endswith(".") and answer[:-1].isdigit():
        return "full_stop", answer[:-1]
    return None, None


def test_preference_pairs_prefer_the_number_alone_and_the_right_answer():
    kinds = dict.fromkeys(mdd.PAIRS, 0)
    for r in read("demo_pref"):
        op, n = _fact(r)
        (c_kind, c_num), (r_kind, r_num) = layout(r["chosen"]), layout(r["rejected"])
        assert c_num == r["answer"] and r_kind is not None, r
        if r_num != r["answer"]:  # a near miss
            assert int(r_num) in {n, n - mdd.OPS[op], n + 2 * mdd.OPS[op], int(r["answer"]) - 10,
                                  int(r["answer"]) + 10}, r
        kinds[(c_kind, True, r_kind, r_num == r["answer"])] += 1  # a KeyError: a kind PAIRS does not make
    total = sum(kinds.values())
    for k, share in mdd.PAIRS.items():
        assert abs(kinds[k] / total - share) < 0.05, kinds
    # the layout alone ranks as many pairs right as wrong: the RM has to check the number
    by_layout = {(c, r): sum(v for k, v in kinds.items() if (k[0], k[2]) == (c, r)) for c, r in
                 [("number", "full_stop"), ("full_stop", "number")]}
    assert abs(by_layout["number", "full_stop"] - by_layout["full_stop", "number"]) < 0.05 * total, by_layout
