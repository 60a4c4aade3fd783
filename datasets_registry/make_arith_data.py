"""Write the data files of the two-digit addition task (described in rlhf/arith_task.py).

    python -m rlhf.datasets_registry.make_arith_data [--out-dir DIR] [--seed N]

Deterministic in the seed. The sums (a + b, both from 10 to 49, asked in several phrasings) split three ways:
SFT sums (arith_sft), RL sums (arith_prompts: PPO samples on sums SFT never taught) and held-out sums (every
*_eval file). arith_pref covers the SFT and RL sums. Every row keeps ``a``, ``b`` and ``answer`` (the sum)
in its columns, so the checker needs nothing else.

The SFT answers mix two layouts, each always correct, as if from two annotators: the equation "a + b = c" (the
layout the preference pairs prefer) and a sentence ("The sum is c."). Which one depends on the phrasing: half the
phrasings get the sentence 3 times in 4, the other half 1 time in 4. So the SFT model, greedy, answers in the
preferred layout only about half the time, and the preference pairs teach what SFT alone does not: the equation
over the sentence, and a correct sum over a near miss.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
LOW, HIGH = 10, 49
SPLIT = {"sft": 0.5, "rl": 0.3, "eval": 0.2}  # shares of the (a, b) pairs
SIZES = {"arith_sft": 600, "arith_sft_eval": 100, "arith_pref": 600, "arith_pref_eval": 100,
         "arith_prompts": 400, "arith_prompts_eval": 100}
SENTENCE_SHARE = (0.75, 0.25)  # SFT answers written as a sentence: even-numbered phrasings, odd-numbered ones

QUESTIONS = ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
             "What do you get when you add {a} and {b}?", "Calculate the sum of {a} and {b}."]
SENTENCES = ["The sum is {c}.", "The answer is {c}.", "{a} plus {b} makes {c}."]


def equation(a: int, b: int, c: int) -> str:
    """The preferred answer style (the one rlhf/arith_task.py scores)."""
    return f"{a} + {b} = {c}"


def near_miss(a: int, b: int, rng: random.Random) -> int:
    """A wrong sum of the kind a small model makes: off by one, by ten, or a dropped/extra carry."""
    c = a + b
    carry = (a % 10) + (b % 10) >= 10
    options = [c + 1, c - 1, c + 10, c - 10, c - 10 if carry else c + 10]
    return rng.choice([o for o in options if o > 0])


def row(a: int, b: int, rng: random.Random) -> dict:
    q = rng.randrange(len(QUESTIONS))
    return {"instruction": QUESTIONS[q].format(a=a, b=b), "input": "", "a": a, "b": b, "answer": str(a + b),
            "phrasing": q}


def sft_row(a: int, b: int, rng: random.Random) -> dict:
    r = row(a, b, rng)
    c = a + b
    sentence = rng.random() < SENTENCE_SHARE[r["phrasing"] % 2]
    r["output"] = rng.choice(SENTENCES).format(a=a, b=b, c=c) if sentence else equation(a, b, c)
    return r


def pref_row(a: int, b: int, rng: random.Random) -> dict:
    """chosen: the correct equation; rejected: half the time the correct sum as a sentence, else a near miss."""
    r = row(a, b, rng)
    c = a + b
    if rng.random() < 0.5:
        rejected = rng.choice(SENTENCES).format(a=a, b=b, c=c)
    else:
        rejected = equation(a, b, near_miss(a, b, rng))
    r.update(chosen=equation(a, b, c), rejected=rejected)
    return r


def build(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    rng.shuffle(pairs)
    n_sft, n_rl = int(len(pairs) * SPLIT["sft"]), int(len(pairs) * SPLIT["rl"])
    facts = {"sft": pairs[:n_sft], "rl": pairs[n_sft:n_sft + n_rl], "eval": pairs[n_sft + n_rl:]}

    def draw(split, n):
        return rng.sample(facts[split], n) if n <= len(facts[split]) else [rng.choice(facts[split]) for _ in range(n)]

    return {
        "arith_sft": [sft_row(a, b, rng) for a, b in draw("sft", SIZES["arith_sft"])],
        "arith_sft_eval": [sft_row(a, b, rng) for a, b in draw("eval", SIZES["arith_sft_eval"])],
        "arith_pref": [pref_row(a, b, rng) for a, b in draw("sft", SIZES["arith_pref"] // 2)
                       + draw("rl", SIZES["arith_pref"] - SIZES["arith_pref"] // 2)],
        "arith_pref_eval": [pref_row(a, b, rng) for a, b in draw("eval", SIZES["arith_pref_eval"])],
        "arith_prompts": [row(a, b, rng) for a, b in draw("rl", SIZES["arith_prompts"])],
        "arith_prompts_eval": [row(a, b, rng) for a, b in draw("eval", SIZES["arith_prompts_eval"])],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DATA_DIR))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
