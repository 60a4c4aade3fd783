"""`rlhf sft` against what a user would pick instead: LLaMA-Factory's SFT and a plain transformers Trainer script.

    OMP_NUM_THREADS=1 python benchmarks/sft_vs_llamafactory.py              # LoRA and QLoRA, 200 steps, 1 repeat
    python benchmarks/sft_vs_llamafactory.py --steps 40 --modes lora        # a quick look
    python benchmarks/sft_vs_llamafactory.py --profile --steps 40           # + the top entries of 10 profiled steps
    python benchmarks/sft_vs_llamafactory.py --model ~/.cache/rlhf/smollm2/SmolLM2-135M-Instruct --steps 20 --modes lora
                                               # a real model: a 49,152-token output layer, ~21% of its matmuls

Every side trains the same random llama (hidden 256 x 4 layers, a 512-token vocabulary) with LoRA r 8 / alpha 32 /
dropout 0 on q_proj,v_proj, fp32 (QLoRA: NF4 4-bit base, double quantization, fp32 compute), AdamW, cosine, lr 2e-4,
batch 8, seed 42, no gradient checkpointing, no checkpoints, no eval during training, on the same 1,800 rows of
demo_sft with identical input ids: rlhf tokenizes them itself (the chatml template the base ships, assistant tokens
trained, ``val_size: 200`` holds 200 rows out); the other two get those token ids (and labels) from this script,
in the same order -- LLaMA-Factory through its ``tokenized_path`` (a saved dataset it loads instead of tokenizing).

Sides, each in its own process, interleaved (a slow spell on the shared cores hits all of them):
- rlhf: ``rlhf sft`` through its command line;
- llamafactory: LLaMA-Factory 0.9.5 (``run_exp``, as ``llamafactory-cli train`` runs it), installed from PyPI into
  its own venv under ``--cache`` (default ~/.cache/rlhf-bench; it pins other versions of transformers, trl, peft,
  so it stays out of the project's venv). The first run creates it (minutes);
- trainer: a plain transformers Trainer + peft script (``DataCollatorForSeq2Seq``; QLoRA through
  ``prepare_model_for_kbit_training`` with gradient checkpointing off, as on the other sides).

Reported: training samples/s by the CPU time of ``Trainer.train()`` (every side trains through it: rlhf's lean
trainer, LLaMA-Factory's CustomSeq2SeqTrainer, the plain one) less the held-out evaluation it runs at its last step
(rlhf's side only: it holds the 200 rows out as an eval split, the others get no eval set), peak RSS of the process,
the peak RSS after 30, 100 and 200 steps (QLoRA: flat within 5% is the goal), and the held-out loss of each adapter
on the 200 held-out rows by ONE scorer (rlhf.evaluate.lm_loss: mean negative log-likelihood per assistant token, in
the project's venv, on the base quantized as it was trained). Ratios are rlhf / other, measured in this invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LF_VERSION = "0.9.5"
RSS_STEPS = (30, 100, 200)
SETTINGS = dict(batch=8, lr=2e-4, lora_r=8, lora_alpha=32, seed=42, max_length=256, val_size=200)


# ---------------------------------------------------------------------------------------------------------------------
# In every child: a spy on transformers.Trainer.train (CPU time, RSS at steps, an optional profile)


def _vm(key: str) -> float:
    """VmRSS / VmHWM of this process now, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spy(rec: dict, profile: bool) -> None:
    """Time every ``transformers.Trainer.train`` of this process, and record the peak RSS at RSS_STEPS (and profile
    steps 10-20 with ``profile``: the top Python functions by own time and torch ops by self CPU time)."""
    import transformers

    real = transformers.Trainer.train

    class Probe(transformers.TrainerCallback):
        prof = cprof = None

        def on_step_begin(self, args, state, control, **kw):
            if profile and state.global_step == 10:
                import cProfile

                import torch.profiler

                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                self.cprof = cProfile.Profile()
                self.cprof.enable()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in RSS_STEPS:
                rec.setdefault("rss_at", {})[str(state.global_step)] = {"peak": _vm("VmHWM"), "now": _vm("VmRSS")}
            if self.prof is not None and state.global_step == 20:
                import io
                import pstats

                self.cprof.disable()
                self.prof.__exit__(None, None, None)
                s = io.StringIO()
                pstats.Stats(self.cprof, stream=s).sort_stats("tottime").print_stats(18)
                rec["profile_python"] = "\n".join(s.getvalue().splitlines()[3:])
                rec["profile_ops"] = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
                self.prof = None

    real_eval = transformers.Trainer._evaluate
    eval_cpu = [0.0]

    def _evaluate(self, *a, **kw):  # the held-out evaluation inside train(): rlhf's side only (an eval split)
        c = time.process_time()
        try:
            return real_eval(self, *a, **kw)
        finally:
            eval_cpu[0] += time.process_time() - c

    def train(self, *a, **kw):
        self.add_callback(Probe())
        t, c = time.perf_counter(), time.process_time()
        out = real(self, *a, **kw)
        rec.update(train_wall_s=time.perf_counter() - t, train_cpu_s=time.process_time() - c - eval_cpu[0],
                   eval_cpu_s=eval_cpu[0], steps=self.state.global_step, train_loss=out.training_loss)
        return out

    transformers.Trainer.train = train
    transformers.Trainer._evaluate = _evaluate


def base_kwargs(mode: str) -> dict:
    """from_pretrained keywords of the base: fp32; QLoRA: NF4 with double quantization, fp32 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    if mode != "qlora":
        return {"dtype": torch.float32}
    return {"dtype": torch.float32, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)}


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def child(args) -> None:
    rec: dict = {}
    spy(rec, args.profile)
    out = str(Path(args.workdir) / f"{args.child}_{args.mode}")
    steps, s = args.steps, SETTINGS
    if args.child == "rlhf":
        from rlhf.cli import cli

        quant = ["--quantization", "4bit"] if args.mode == "qlora" else []
        cli.main(args=["sft", "--model-name-or-path", args.base, "--dataset", args.rows, "--val-size",
                       str(s["val_size"]), "--template", "own", "--max-length", str(s["max_length"]),
                       "--output-dir", out, "--overwrite-output-dir", "true", "--max-steps", str(steps),
                       "--per-device-train-batch-size", str(s["batch"]), "--learning-rate", str(s["lr"]),
                       "--lr-scheduler-type", "cosine", "--warmup-ratio", "0", "--lora-r", str(s["lora_r"]),
                       "--lora-alpha", str(s["lora_alpha"]), "--lora-dropout", "0", "--lora-target", "q_proj,v_proj",
                       "--dtype", "float32", "--seed", str(s["seed"]), "--logging-steps", "10",
                       "--save-steps", "100000", "--task-eval-samples", "0", *quant], standalone_mode=False)
    elif args.child == "llamafactory":
        import types

        # LLaMA-Factory 0.9.5 imports torchaudio at module level for its audio inputs (data/mm_plugin.py), and PyPI
        # has no torchaudio built for this torch; text SFT never calls it, so an empty module stands in
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
        from datasets import Dataset, DatasetDict
        from llamafactory.train.tuner import run_exp

        tokenized = str(Path(args.workdir) / "lf_tokenized")
        if not Path(tokenized).is_dir():
            rows = [dict(r, attention_mask=[1] * len(r["input_ids"])) for r in read_rows(args.train_ids)]
            DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tokenized)
        quant = {"quantization_bit": 4, "quantization_method": "bnb"} if args.mode == "qlora" else {}
        run_exp(dict(stage="sft", do_train=True, model_name_or_path=args.base, template="empty",
                     dataset="demo_sft", tokenized_path=tokenized, cutoff_len=s["max_length"], finetuning_type="lora",
                     lora_rank=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                     lora_target="q_proj,v_proj", output_dir=out, overwrite_output_dir=True,
                     per_device_train_batch_size=s["batch"], learning_rate=s["lr"], lr_scheduler_type="cosine",
                     warmup_steps=0, max_steps=steps, logging_steps=10, save_strategy="no", report_to="none",
                     seed=s["seed"], data_seed=s["seed"], bf16=False, fp16=False, disable_gradient_checkpointing=True,
                     dataloader_num_workers=0, plot_loss=False, **quant))
    else:  # a plain transformers Trainer + peft script
        import torch
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                                  TrainingArguments)

        tok = AutoTokenizer.from_pretrained(args.base)
        model = AutoModelForCausalLM.from_pretrained(args.base, **base_kwargs(args.mode))
        if args.mode == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        targs = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch"],
                                  learning_rate=s["lr"], lr_scheduler_type="cosine", seed=s["seed"],
                                  data_seed=s["seed"], logging_steps=10, save_strategy="no", report_to="none",
                                  use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(read_rows(args.train_ids)),
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        trainer.train()
        trainer.save_model(out)
    print(json.dumps({**rec, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "adapter": out}))


# ---------------------------------------------------------------------------------------------------------------------
# The one scorer, in the project's venv


def score(args) -> None:
    """Held-out loss per assistant token (rlhf.evaluate.lm_loss) of the adapter in ``args.adapter``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.evaluate import lm_loss
    from rlhf.loader import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(args.base, **base_kwargs(args.mode))
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    loss, tokens = lm_loss(model, load_tokenizer(args.base), read_rows(args.eval_rows), SETTINGS["max_length"])
    print(json.dumps({"heldout_loss": loss, "heldout_tokens": tokens}))


def prepare(work: Path, hidden: int, layers: int, model: str | None = None) -> tuple[str, str, str, str]:
    """The base, a snapshot of the demo_sft rows (every side reads this copy), the training rows as token ids (rlhf's
    own tokenization and order) and the held-out conversations."""
    import shutil

    sys.path.insert(0, str(HERE))
    from common import ROOT, make_base

    from rlhf.loader import load_tokenizer
    from rlhf.stages.sft import SFTConfig, tokenize
    from rlhf.train_utils import load_train_eval

    base = model or make_base(work / "base", hidden, layers)
    rows = str(shutil.copy(ROOT / "datasets_registry" / "data" / "demo_sft.jsonl", work / "demo_sft.jsonl"))
    cfg = SFTConfig(model_name_or_path=base, dataset=[rows], val_size=SETTINGS["val_size"],
                    max_length=SETTINGS["max_length"], seed=SETTINGS["seed"])
    train, evals, _ = load_train_eval(cfg, kind="sft")
    ds = tokenize(train, load_tokenizer(base), cfg)
    ids, held = work / "train_ids.jsonl", work / "heldout.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n" for r in ds))
    held.write_text("".join(json.dumps({"messages": e["messages"]}) + "\n" for e in evals))
    return base, rows, str(ids), str(held)


def lf_python(cache: Path) -> str:
    """LLaMA-Factory's own venv under ``cache``, created on first use (torch pinned to the project's build)."""
    import torch

    venv = cache / f"llamafactory-{LF_VERSION}"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import llamafactory, bitsandbytes, transformers.trainer"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(py)
    print(f"installing LLaMA-Factory {LF_VERSION} into {venv} (once; minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pin = cache / "constraints.txt"
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # else its pins pull another (CUDA) torch
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pin), f"llamafactory=={LF_VERSION}",
                    "bitsandbytes"], check=True)
    # the torchvision/torchaudio it pulls are built for another torch and fail to load (text SFT needs neither)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
    return str(py)


def run_side(python: str, argv: list[str], timeout: int = 3600) -> dict:
    """One child; its result (last JSON line) plus the CPU time of its whole process tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "DISABLE_VERSION_CHECK": "1",
           "PYTHONPATH": str(HERE.parent)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([python, __file__, *argv], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=HERE.parent)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(f"child {' '.join(argv)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    res["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model", help="a model folder to train instead of the random llama (e.g. the SmolLM2-135M "
                                    "folder scripts/fetch_smollm2.py writes: a real vocabulary's output layer)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per side; the fastest is kept")
    ap.add_argument("--modes", default="lora,qlora")
    ap.add_argument("--sides", default="rlhf,llamafactory,trainer")
    ap.add_argument("--profile", action="store_true", help="print the top entries of steps 10-20 of each side")
    ap.add_argument("--cache", default=os.environ.get("RLHF_BENCH_CACHE", "~/.cache/rlhf-bench"))
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    for hidden in ("child", "mode", "workdir", "base", "rows", "train_ids", "eval_rows", "adapter"):
        ap.add_argument(f"--{hidden.replace('_', '-')}", help=argparse.SUPPRESS)
    ap.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.score:
        return score(args)
    if args.child:
        return child(args)

    sides, modes = args.sides.split(","), args.modes.split(",")
    pythons = {"rlhf": sys.executable, "trainer": sys.executable}
    if "llamafactory" in sides:
        pythons["llamafactory"] = lf_python(Path(args.cache).expanduser())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sft_vs_lf_") as tmp:
        base, rows, ids, held = prepare(Path(tmp), args.hidden, args.layers, args.model)
        for _ in range(args.repeats):
            for mode in modes:
                for side in sides:
                    r = run_side(pythons[side], ["--child", side, "--mode", mode, "--workdir", tmp, "--base", base,
                                                 "--rows", rows, "--train-ids", ids, "--steps", str(args.steps)]
                                 + (["--profile"] if args.profile else []))
                    key = (mode, side)
                    if key not in results or r["train_cpu_s"] < results[key]["train_cpu_s"]:
                        results[key] = r
                    s = run_side(sys.executable, ["--score", "--mode", mode, "--base", base, "--eval-rows", held,
                                                  "--adapter", r["adapter"]])
                    r.update(heldout_loss=s["heldout_loss"], heldout_tokens=s["heldout_tokens"])  # not its CPU
    print_report(args, results, modes, sides, load)


def print_report(args, results: dict, modes: list[str], sides: list[str], load: str) -> None:
    sys.path.insert(0, str(HERE))
    from common import md_table, write_json

    n = SETTINGS["batch"] * args.steps
    header = ["", *[f"{m} {s}" for m in modes for s in sides]]
    row = lambda name, f: [name, *[f(results[m, s]) for m in modes for s in sides]]  # noqa: E731
    rows = [row("train samples/s (CPU time)", lambda r: f"{n / r['train_cpu_s']:.2f}"),
            row("train CPU s / whole process CPU s", lambda r: f"{r['train_cpu_s']:.1f} / {r['process_cpu_s']:.1f}"),
            row("peak RSS (MiB)", lambda r: f"{r['peak_rss_mib']:.0f}")]
    def rss_at(r, k):
        return f"{r['rss_at'][str(k)]['peak']:.0f}" if str(k) in r.get("rss_at", {}) else "-"

    rows += [row(f"peak RSS at step {k} (MiB)", lambda r, k=k: rss_at(r, k)) for k in RSS_STEPS if k <= args.steps]
    rows.append(row("held-out loss per token (one scorer)", lambda r: f"{r['heldout_loss']:.4f}"))
    ratios = []
    for m in modes:
        a = results[m, "rlhf"] if "rlhf" in sides else None
        for s in sides:
            if s == "rlhf" or a is None:
                continue
            b = results[m, s]
            ratios.append([f"{m}: rlhf / {s}", f"{b['train_cpu_s'] / a['train_cpu_s']:.3f}",
                           f"{a['peak_rss_mib'] / b['peak_rss_mib']:.3f}",
                           f"{a['heldout_loss'] - b['heldout_loss']:+.4f}"])
    flat = []
    for m in modes:
        for s in sides:
            at = results[m, s].get("rss_at", {})
            if all(str(k) in at for k in RSS_STEPS):
                first, last = at[str(RSS_STEPS[0])]["peak"], at[str(RSS_STEPS[-1])]["peak"]
                flat.append(f"{m} {s}: peak RSS step {RSS_STEPS[-1]} / step {RSS_STEPS[0]} = {last / first:.3f}")
    model = args.model or f"llama hidden {args.hidden} x {args.layers}"
    title = (f"rlhf sft vs LLaMA-Factory {LF_VERSION} vs plain transformers Trainer: {model}, LoRA r8/a32 "
             f"q,v, batch 8, {args.steps} steps on 1,800 demo_sft rows (identical ids), best of {args.repeats}; "
             f"load average before: {load}")
    table = md_table(header, rows)
    ratio_table = md_table(["ratio", "throughput (CPU time)", "peak RSS", "held-out loss difference"], ratios)
    print(title + "\n\n" + table + "\n\n" + ratio_table + "\n\n" + "\n".join(flat))
    if args.profile:
        for (m, s), r in results.items():
            if "profile_python" in r:
                print(f"\n### profile of steps 10-20: {m} {s}\n\nPython, by own time:\n{r['profile_python']}\n\n"
                      f"torch ops, by self CPU time:\n{r['profile_ops']}")
    write_json(args.json, {"title": title, "table": table, "ratios": ratio_table, "flat": flat,
                           "raw": {f"{m} {s}": r for (m, s), r in results.items()}})


if __name__ == "__main__":
    main()
