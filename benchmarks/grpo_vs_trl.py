"""`rlhf grpo` (policy, reference and reward model as adapters of one base) vs trl's GRPOTrainer (policy + its "ref"
adapter copy on one base, the reward model a separate model, as trl takes it): CPU seconds per step and peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py                      # ~20M-param llama, fp32, CPU
    python benchmarks/grpo_vs_trl.py --hidden 1024 --layers 8 --steps 1 4 --repeats 1

Setup (once, in --root): a random llama (benchmarks/common.py make_base), an SFT folder and an RM folder from it
(`rlhf sft`, `rlhf rm`, a few steps on the demo data, so both are real stage folders). Then each side runs in its
own child process, twice: for S1 and for S2 GRPO steps (--steps). The same model, prompts (demo_prompts), k
responses per prompt, prompt/response lengths, steps, learning rate and KL coefficient on both sides; one optimizer
step per GRPO step (4 prompts x 8 responses); no evaluation, no checkpoints on trl's side. CPU per step is
(CPU(S2) - CPU(S1)) / (S2 - S1) of the whole child process (model loading and other one-off costs cancel); with
one thread it is what a step costs, while wall time swings when other jobs share the cores. Peak RSS is the S2
child's VmHWM (its own peak: ru_maxrss would carry the parent's over the fork); "over imports" subtracts a child
that only imports torch, transformers, peft and trl and builds nothing. The runs are interleaved --repeats times
and the least CPU kept.

Batch sizes, the same work on both sides: generation samples the 32 responses in one batch (rlhf's
per_device_eval_batch_size = prompts x k; trl's generation_batch_size, per_device_train_batch_size x
gradient_accumulation_steps), the RM scores them in one batch (rlhf: per_device_eval_batch_size; trl: the whole
generation batch), the reference log-probs are one no-grad pass over 32 rows for rlhf and chunks of the micro-batch
for trl, the update runs micro-batches of --micro on both. fp32 weights on both; prompts (<= 38 tokens here) are
neither cut nor skipped on either side.

Peak RSS with glibc's default allocator includes what malloc keeps after frees (its dynamic mmap threshold sends
the update's activations to the heap, which is not returned: at --micro 8 the heap, RssAnon, grew by 540-650 MiB over
the update on both sides for ~215 MiB of activations). rlhf grpo hands the freed pages back (malloc_trim) before its
update and after every micro-batch's backward (rlhf.online.release_freed_memory; docs/dpo_grpo.md, "Trimming the
heap"); trl's side runs as trl ships. --malloc-mmap-threshold N sets
MALLOC_MMAP_THRESHOLD_=N for every child (both sides and the imports child): allocations above N bytes are mmapped
and returned on free, so the peak is close to what the tensors take; it costs CPU (page faults) on both sides, so
read the CPU ratio from a run without it. --phases 1 records, in each child, VmRSS, VmHWM, RssAnon (heap, tensors)
and RssFile (libraries, the mmapped safetensors weights) after every generation, reward, log-prob pass, backward
and optimizer step, and prints them for the S1 children (where a peak comes from). --gradient-checkpointing 1 turns
it on on both sides (rlhf's gradient_checkpointing, trl's GRPOConfig.gradient_checkpointing; both still generate
with the KV cache): the update then keeps one input per layer, and the peaks are mostly weights, imports and heap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, make_base, md_table, rss_mib, run_child  # noqa: E402  (sets ENV)

PROMPTS = "demo_prompts"


def make_parents(root: Path, hidden: int, layers: int, heads: int) -> dict:
    """A base, and SFT and RM stage folders on it (reused when there). The SFT steps are tiny (learning rate
    1e-6): the policy stays near the random base, which seldom emits a stop token, so both sides generate the full
    response length and do the same work."""
    from rlhf.config import load_config
    from rlhf.stages import rm, sft

    base = make_base(root / "base", hidden=hidden, layers=layers, heads=heads)
    common = dict(max_steps=3, max_length=64, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                  lora_target="all-linear", lora_dropout=0.0, save_steps=100)
    out = {"base": base, "sft": str(root / "sft"), "rm": str(root / "rm")}
    if not (root / "sft" / "manifest.json").is_file():
        sft.run(load_config(sft.SFTConfig, None, dict(common, model_name_or_path=base, dataset="demo_sft",
                                                      output_dir=out["sft"], task_eval_samples=0,
                                                      learning_rate=1e-6)))
    if not (root / "rm" / "manifest.json").is_file():
        rm.run(load_config(rm.RMConfig, None, dict(common, sft_dir=out["sft"], dataset="demo_pref",
                                                   output_dir=out["rm"])))
    return out


def cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


PHASES: list[list] = []  # --phases: [what, VmRSS, VmHWM, RssAnon, RssFile] in MiB after each watched call


def status_mib() -> dict:
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    rows = (line.split() for line in Path("/proc/self/status").read_text().splitlines())
    return {r[0][:-1]: int(r[1]) / 1024 for r in rows if r and r[0][:-1] in keys}


def watch(a, targets) -> None:
    """With --phases: wrap each (object, method name) of ``targets`` (and accelerate's backward and optimizer step)
    to append a PHASES row after every call."""
    if not a.phases:
        return
    import functools

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    for obj, name in [*targets, (Accelerator, "backward"), (AcceleratedOptimizer, "step")]:
        def wrapped(*args, _f=getattr(obj, name), _what=f"{obj.__name__.rpartition('.')[2]}.{name}", **kw):
            out = _f(*args, **kw)
            rows = next((len(x) for x in args if hasattr(x, "shape") and x.dim() == 2), None)  # ids: (rows, T)
            m = status_mib()
            PHASES.append([_what + (f" ({rows} rows)" if rows else ""), m["VmRSS"], m["VmHWM"], m["RssAnon"],
                           m["RssFile"]])
            return out
        setattr(obj, name, functools.wraps(getattr(obj, name))(wrapped))


def child_ours(a, parents: dict) -> dict:
    import shutil

    from rlhf.config import load_config
    from rlhf.roles import OneBase
    from rlhf.stages import grpo

    watch(a, [(grpo, "generate"), (OneBase, "policy_forward"), (grpo, "score_responses")])
    out = Path(a.root) / f"ours_{a.child_steps}"
    shutil.rmtree(out, ignore_errors=True)
    grpo.run(load_config(grpo.GRPOConfig, None, dict(
        sft_dir=parents["sft"], rm_dir=parents["rm"], reward_funcs=[], dataset=PROMPTS, max_prompt_length=64,
        batch_size=a.prompts, num_generations=a.k, max_new_tokens=a.new_tokens, max_steps=a.child_steps,
        kl_coef=a.kl_coef, learning_rate=a.lr, temperature=1.0, loss_type="grpo", num_iterations=1,
        mini_batch_size=a.prompts * a.k, per_device_train_batch_size=a.micro or a.prompts * a.k,
        per_device_eval_batch_size=a.prompts * a.k, eval_samples=0,
        sample_every=0, save_steps=10**6, seed=a.seed, output_dir=str(out), lora_dropout=0.0,
        gradient_checkpointing=bool(a.gradient_checkpointing))))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"response_length": sum(r["response_length"] for r in rows) / len(rows)}


def child_trl(a, parents: dict) -> dict:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.data import load_examples
    from rlhf.loader import load_tokenizer
    from rlhf.templates import stop_token_ids

    watch(a, [(GRPOTrainer, "_generate"), (GRPOTrainer, "_get_per_token_logps_and_entropies"),
              (GRPOTrainer, "_calculate_rewards")])
    tok = load_tokenizer(parents["sft"])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parents["base"]), parents["sft"],
                                       is_trainable=True)
    reward = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        parents["base"], num_labels=1, pad_token_id=tok.pad_token_id), parents["rm"]).eval()
    rows = load_examples([PROMPTS], kind="prompt")
    ds = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    micro = a.micro or a.prompts * a.k  # one optimizer step per generation batch of prompts x k, as rlhf grpo
    args = GRPOConfig(output_dir=str(Path(a.root) / "trl_out"), per_device_train_batch_size=micro,
                      gradient_accumulation_steps=a.prompts * a.k // micro,
                      num_generations=a.k, max_completion_length=a.new_tokens, max_steps=a.child_steps,
                      learning_rate=a.lr, beta=a.kl_coef, loss_type="grpo", temperature=1.0, num_iterations=1,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=a.seed,
                      disable_dropout=True, gradient_checkpointing=bool(a.gradient_checkpointing),
                      lr_scheduler_type="linear",
                      generation_kwargs={"eos_token_id": stop_token_ids(tok)})  # stop where rlhf grpo stops
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                          reward_processing_classes=[tok])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"response_length": sum(lengths) / max(len(lengths), 1)}


def child_imports(a, parents: dict) -> dict:
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import GRPOTrainer  # noqa: F401

    return {}


def peak_rss_mib() -> float:
    """This process's peak RSS since it started (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so a
    child of a parent that built the models would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return rss_mib()


def child(a, children: dict) -> None:
    """In a child process: run ``children[a.child]`` and print its JSON line (CPU, wall, peak RSS)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    parents = json.loads(Path(a.root, "parents.json").read_text())
    t, c = time.time(), cpu_s()
    res = children[a.child](a, parents)
    if PHASES:
        res["phases"] = PHASES
    print(json.dumps({**res, "side": a.child, "steps": a.child_steps, "cpu_s": cpu_s(), "run_cpu_s": cpu_s() - c,
                      "wall_s": time.time() - t, "peak_rss_mib": peak_rss_mib()}))


def add_common_args(p: argparse.ArgumentParser, steps: list[int]) -> None:
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, nargs=2, default=steps, metavar=("S1", "S2"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="work folder (default: a new temporary one); its parents are reused")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ of every child, in bytes (0: glibc's default, dynamic)")
    p.add_argument("--child", choices=["ours", "trl", "imports"], help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=0, help=argparse.SUPPRESS)


def compare(script: str, a, flag_keys: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    """The parent process: build the parents, run every side for S1 and S2 steps (and the imports-only child),
    interleaved --repeats times, print the table, the ratios rlhf/trl and a JSON line."""
    root = Path(a.root or tempfile.mkdtemp(prefix=Path(script).stem + "_"))
    root.mkdir(parents=True, exist_ok=True)
    if a.malloc_mmap_threshold:  # read by glibc when a child starts (run_child passes os.environ on)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    (root / "parents.json").write_text(json.dumps(make_parents(root, a.hidden, a.layers, a.heads)))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in flag_keys + ("seed",)]

    def run(side_steps):
        side, steps = side_steps
        return run_child([script, "--child", side, "--child-steps", str(steps), "--root", str(root), *flags])

    sides = [(s, n) for s in ("ours", "trl") for n in a.steps] + [("imports", 0)]
    got = best_of(a.repeats, sides, run, key=lambda r: r["cpu_s"])
    s1, s2 = a.steps
    per_step = {s: (got[(s, s2)]["cpu_s"] - got[(s, s1)]["cpu_s"]) / (s2 - s1) for s in ("ours", "trl")}
    imports = got[("imports", 0)]["peak_rss_mib"]
    rss = {s: got[(s, s2)]["peak_rss_mib"] for s in ("ours", "trl")}
    rows = [[s, f"{per_step[s]:.2f}", f"{rss[s]:.0f}", f"{rss[s] - imports:.0f}",
             *(f"{got[(s, s2)][k]:.1f}" for k in extra)] for s in ("ours", "trl")]
    print(md_table(["side", "CPU s/step", "peak RSS MiB", "over imports MiB", *extra], rows))
    ratios = {"time_ratio": per_step["ours"] / per_step["trl"], "rss_ratio": rss["ours"] / rss["trl"],
              "rss_over_imports_ratio": (rss["ours"] - imports) / (rss["trl"] - imports)}
    print(f"ratios rlhf/trl: CPU per step {ratios['time_ratio']:.2f}x, peak RSS {ratios['rss_ratio']:.2f}x "
          f"({ratios['rss_over_imports_ratio']:.2f}x over the {imports:.0f} MiB of imports)")
    result = {"machine": machine(), "args": vars(a), "per_step_cpu_s": per_step, "peak_rss_mib": rss,
              "imports_rss_mib": imports, **ratios, "runs": {f"{s}_{n}": r for (s, n), r in got.items()}}
    for s in ("ours", "trl"):
        if phases := got[(s, s1)].get("phases"):
            print(f"\n{s}, {s1} step(s): MiB after each call (VmHWM: the peak so far)")
            print(md_table(["after", "VmRSS", "VmHWM", "RssAnon", "RssFile"],
                           [[p[0], *(f"{x:.0f}" for x in p[1:])] for p in phases]))
    print(json.dumps(result, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, steps=[1, 4])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=8, help="responses per prompt")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--micro", type=int, default=0, help="micro-batch of the update (0: all prompts x k at once)")
    p.add_argument("--kl-coef", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--phases", type=int, default=0, help="1: memory after each phase of the S1 children")
    p.add_argument("--gradient-checkpointing", type=int, default=0, help="1: gradient checkpointing on both sides")
    a = p.parse_args()
    if a.child:
        return child(a, {"ours": child_ours, "trl": child_trl, "imports": child_imports})
    compare(__file__, a, ("prompts", "k", "new_tokens", "micro", "kl_coef", "lr", "phases", "gradient_checkpointing"),
            extra=("response_length",))


if __name__ == "__main__":
    main()
