"""Write the embedded demo's data files (the task is described in rlhf/demo_task.py).

    python -m rlhf.datasets_registry.make_demo_data [--out-dir DIR] [--seed N]

Deterministic in the seed. The facts (questions up to phrasing) split three ways: SFT
facts (demo_sft, and the corpus's quiz lines), RL facts (demo_prompts: PPO samples on
questions SFT never taught) and held-out facts (every *_eval file). demo_pref covers
the SFT and RL facts (fewer facts let the reward model memorise answers instead of
learning to check them). The pre-training corpus counts through every number and states
every fact in prose. Every task row keeps its reference answer (the number) in an ``answer``
column. SFT answers mix two layouts by phrasing (``PLAIN_SHARE``); preference pairs prefer the
number alone, and a right answer over a near miss (``PAIRS``).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhf.demo_task import FULL_STOP

DATA_DIR = Path(__file__).parent / "data"
LOW, HIGH = 10, 99  # every number in the task; questions ask about LOW+1 .. HIGH-1
OPS = {"after": 1, "before": -1}  # the answer is n + OPS[op]
SPLIT = {"sft": 0.5, "rl": 0.3, "eval": 0.2}  # shares of the facts
SIZES = {  # rows per file
    "demo_corpus": 4000,
    "demo_sft": 2000,
    "demo_sft_eval": 200,
    "demo_pref": 2000,
    "demo_pref_eval": 200,
    "demo_prompts": 1000,
    "demo_prompts_eval": 200,
}

# The SFT answers' layouts: the share answered with the number alone (the rest "N."), by the
# question's direction. The SFT model follows the preferred layout on about half the prompts, greedy, and samples
# the other layout a fifth of the time: PPO has something to move and the samples to move it with.
PLAIN_SHARE = {"after": 0.8, "before": 0.2}
# Kinds of preference pairs and their shares: (chosen, rejected) as (layout, right?). The number alone over the full
# stop (both right); right over a near miss in the same layout; the right full stop over a wrong number alone (the
# answer outranks the layout). Balanced so that the layout alone ranks no more pairs right than wrong (0.2 each way):
# with pairs where it mostly did, an RM seed learned the layout only and never checked the number (accuracy 0.59).
PAIRS = {("number", True, "full_stop", True): 0.2, ("number", True, "number", False): 0.3,
         ("full_stop", True, "full_stop", False): 0.3, ("full_stop", True, "number", False): 0.2}

QUESTIONS = {
    "after": ["What number comes after {n}?", "What comes right after {n}?", "What is one more than {n}?",
              "Which number follows {n}?"],
    "before": ["What number comes before {n}?", "What comes right before {n}?", "What is one less than {n}?",
               "Which number precedes {n}?"],
}
# Prose for the corpus ({m} is the answer).
FACTS = {
    "after": ["After {n} comes {m}.", "{m} is one more than {n}.", "{m} follows {n}."],
    "before": ["Before {n} comes {m}.", "{m} is one less than {n}.", "{m} precedes {n}."],
}
# Question-and-answer lines of the corpus: other layouts than the chat template's, with gaps of
# varying length between question and answer (so the model looks the question up by content).
QUIZ = ["Q: {q}{gap} A: {a}.", "Question: {q}{gap}\nAnswer: {a}.", "{q}{gap} The answer is {a}.",
        "Teacher: {q}{gap}\nStudent: {a}.", "{q}{gap}\n- {a}."]
GAPS = ["", "", " Think about it.", " Take your time.", " Hmm, let me see.", "\nA student raises a hand.",
        " (from the quiz)", " Write only the number.", "\n\nOk, here it is:", " Please answer. Thank you!"]

NOUNS = ["cat", "dog", "bird", "tree", "river", "house", "book", "apple", "car", "city", "teacher", "child",
         "farmer", "garden", "boat", "song", "letter", "window", "road", "friend", "lamp", "horse", "cake", "hill"]
VERBS = ["sees", "likes", "finds", "reads", "draws", "follows", "paints", "builds", "visits", "carries",
         "watches", "remembers", "opens", "cleans", "helps"]
ADJS = ["small", "red", "old", "quiet", "happy", "green", "tall", "bright", "slow", "kind", "busy", "warm",
        "cold", "young", "blue", "heavy"]
PLACES = ["in the park", "by the sea", "at school", "in the kitchen", "near the bridge", "on the farm",
          "in the morning", "after lunch", "at night", "in the village"]
FILLER = [
    "The {j} {n} {v} the {n2} {p}.",
    "A {j} {n} {v} a {j2} {n2}.",
    "Every day the {n} {v} the {n2}.",
    "My {n} is {j} and my {n2} is {j2}.",
    "The {n} was {j}, so the {n2} stayed {p}.",
    "There are {k} {n}s {p}.",
    "The {j} {n} has {k} {n2}s.",
    "We counted {k} {j} {n}s {p}.",
    "She wrote a {j} letter to the {n}.",
    "Why does the {n} look so {j}?",
]

Fact = tuple[str, int]  # (op, n): "what comes <op> n?"


def answer_of(fact: Fact) -> int:
    op, n = fact
    return n + OPS[op]


def all_facts() -> list[Fact]:
    return [(op, n) for op in OPS for n in range(LOW + 1, HIGH)]


def split_facts(rng: random.Random) -> dict[str, list[Fact]]:
    """The facts of each part of ``SPLIT`` (disjoint)."""
    facts = all_facts()
    rng.shuffle(facts)
    n_sft, n_rl = round(SPLIT["sft"] * len(facts)), round(SPLIT["rl"] * len(facts))
    return {"sft": sorted(facts[:n_sft]), "rl": sorted(facts[n_sft : n_sft + n_rl]),
            "eval": sorted(facts[n_sft + n_rl :])}


def question(rng: random.Random, fact: Fact) -> dict:
    """One task row {instruction, input, answer} asking ``fact``."""
    op, n = fact
    return {"instruction": rng.choice(QUESTIONS[op]).format(n=n), "input": "", "answer": str(answer_of(fact))}


def in_layout(answer: str, plain: bool) -> str:
    """The answer alone (the preferred layout) or with a full stop (rlhf/demo_task.py)."""
    return answer if plain else FULL_STOP.format(answer)


def sft_row(rng: random.Random, fact: Fact) -> dict:
    """An SFT row: the layout drawn with the share ``PLAIN_SHARE`` of the question's direction."""
    q = question(rng, fact)
    return {"instruction": q["instruction"], "input": q["input"],
            "output": in_layout(q["answer"], rng.random() < PLAIN_SHARE[fact[0]]), "answer": q["answer"]}


def pref_row(rng: random.Random, fact: Fact) -> dict:
    """A preference pair of one of ``PAIRS``' kinds."""
    q = question(rng, fact)
    kinds = list(PAIRS)
    chosen_layout, _, rejected_layout, rejected_right = rng.choices(kinds, weights=[PAIRS[k] for k in kinds])[0]
    rejected = q["answer"] if rejected_right else near_miss(rng, fact)
    return {"instruction": q["instruction"], "input": q["input"],
            "chosen": in_layout(q["answer"], chosen_layout == "number"),
            "rejected": in_layout(rejected, rejected_layout == "number"), "answer": q["answer"]}


def near_miss(rng: random.Random, fact: Fact) -> str:
    """A plausible wrong answer: the number itself, the other direction, one step too far, or off by ten."""
    op, n = fact
    step = OPS[op]
    right = n + step
    wrong = rng.choice([n, n - step, n + 2 * step, right + rng.choice([-10, 10])])
    return str(wrong if wrong >= 0 else right + 10)


def corpus_line(rng: random.Random, quiz_facts: list[Fact]) -> str:
    """One line: a counting run, prose facts, quiz questions (about ``quiz_facts`` only), or filler."""
    r = rng.random()
    if r < 0.3:
        start = rng.randint(LOW, HIGH - 6)
        run = ", ".join(str(k) for k in range(start, start + rng.randint(3, 7)))
        return rng.choice(["Counting up: ", "We count ", ""]) + run + "."
    if r < 0.55:
        facts = [rng.choice(all_facts()) for _ in range(rng.randint(1, 3))]
        return " ".join(rng.choice(FACTS[f[0]]).format(n=f[1], m=answer_of(f)) for f in facts)
    if r < 0.75:
        fmt = rng.choice(QUIZ)
        rows = [question(rng, rng.choice(quiz_facts)) for _ in range(rng.randint(1, 3))]
        return rng.choice([" ", "\n"]).join(fmt.format(q=q["instruction"], gap=rng.choice(GAPS),
                                                       a=q["answer"]) for q in rows)
    words = dict(n=rng.choice(NOUNS), n2=rng.choice(NOUNS), v=rng.choice(VERBS), j=rng.choice(ADJS),
                 j2=rng.choice(ADJS), p=rng.choice(PLACES), k=rng.randint(2, 99))
    return " ".join(rng.choice(FILLER).format(**words) for _ in range(rng.randint(1, 2)))


def build(seed: int = 0) -> dict[str, list[dict]]:
    """Every demo file's rows, by file name (without .jsonl)."""
    rng = random.Random(seed)
    facts = split_facts(rng)
    corpus = [{"text": corpus_line(rng, facts["sft"])} for _ in range(SIZES["demo_corpus"])]
    files: dict[str, list[dict]] = {"demo_corpus": corpus}
    parts = {"": (facts["sft"], facts["sft"] + facts["rl"], facts["rl"]), "_eval": (facts["eval"],) * 3}
    for suffix, (sft_facts, pref_facts, rl_facts) in parts.items():
        prompts = []
        sft = [sft_row(rng, rng.choice(sft_facts)) for _ in range(SIZES["demo_sft" + suffix])]
        pref = [pref_row(rng, rng.choice(pref_facts)) for _ in range(SIZES["demo_pref" + suffix])]
        for _ in range(SIZES["demo_prompts" + suffix]):
            prompts.append(question(rng, rng.choice(rl_facts)))
        files["demo_sft" + suffix], files["demo_pref" + suffix], files["demo_prompts" + suffix] = sft, pref, prompts
    return files


def write(out_dir: str | Path = DATA_DIR, seed: int = 0) -> list[Path]:
    """Write every demo file into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in build(seed).items():
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(DATA_DIR),
                    help="folder to write the .jsonl files into (default: the shipped data/)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the shipped files use 0)")
    args = ap.parse_args(argv)
    for p in write(args.out_dir, args.seed):
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
