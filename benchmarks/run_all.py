"""Run every benchmark and write one markdown report (default benchmarks/results.md).

    OMP_NUM_THREADS=1 python benchmarks/run_all.py                # the full set, ~30 min on 2 CPU cores
    python benchmarks/run_all.py --quick --output /tmp/results.md # tiny sizes, to check the scripts

One benchmark at a time, each in its own processes with one thread (docs/known_traps.md: never two torch
processes with 2 threads at once on shared cores). The report names the machine and the load average (as uptime
prints it) before and after each benchmark: other processes on the machine slow the timings, not the ratios much,
since each ratio is measured within one invocation from interleaved runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, ROOT, load_average, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
QUICK = {
    "sft_vs_llamafactory.py": ["--hidden", "64", "--layers", "2", "--steps", "30", "--modes", "lora"],
    "packing.py": ["--hidden", "64", "--layers", "2", "--steps", "5", "--repeats", "1"],
    "quant_memory.py": ["--hidden", "256", "--layers", "2", "--steps", "1"],
    "qlora_table.py": ["--pt-steps", "30", "--steps", "10", "--eval-samples", "8"],
    "ppo_one_base.py": ["--hidden", "64", "--layers", "2", "--steps", "1", "--repeats", "1"],
    "data_parallel.py": ["--hidden", "64", "--layers", "2", "--steps", "4", "--repeats", "1"],
}


def estimate_anchors() -> str:
    from rlhf import estimate as E

    s65 = E.load_shape("65b")
    full = E.estimate(s65, E.Setup(method="full_16bit", batch_size=1, seq_len=512, optim="adamw_torch"))
    qlora = E.estimate(s65, E.Setup(method="qlora_4bit", lora_r=64, lora_target=["all-linear"], lora_dropout=0.05,
                                    batch_size=1, seq_len=512, gradient_checkpointing=True, optim="paged_adamw_32bit"))
    dq = (E.weight_bytes(s65, E.Setup(method="qlora_4bit",
                                      double_quant=False)) - E.weight_bytes(s65, E.Setup(method="qlora_4bit"))) / 1e9
    return "\n".join([
        "| published figure | rlhf estimate |", "|---|---:|",
        f"| LLaMA-65B, full 16-bit fine-tuning with Adam: \"more than 780 GB\" (QLoRA paper) | {full.states / 1e9:.0f} "
        "GB "
        f"(weights + gradients + Adam; peak with activations and the foreach step: {full.peak / 1e9:.0f} GB) |",
        "| LLaMA-65B QLoRA (NF4 + DQ, r 64 all linear, batch 1 x 512, checkpointing, paged AdamW) fits one 48 GB GPU "
        "| "
        f"{qlora.peak / E.GIB:.1f} GiB peak |",
        f"| double quantization saves \"approximately 3 GB for a 65B model\" | {dq:.2f} GB |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=str(HERE / "results.md"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks the scripts, figures mean little)")
    ap.add_argument("--only", nargs="*", help="run only these scripts (e.g. packing.py)")
    args = ap.parse_args()

    info = machine()
    scripts = ["sft_vs_llamafactory.py", "packing.py", "quant_memory.py", "qlora_table.py", "ppo_one_base.py",
               "data_parallel.py"]
    if args.only:
        scripts = [s for s in scripts if s in args.only]
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
    parts = []
    for script in scripts:
        extra = QUICK[script] if args.quick else []
        before = load_average()
        t = time.time()
        print(f"== {script} {' '.join(extra)} (load {before})", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            json_arg = [] if script == "ppo_one_base.py" else ["--json", f.name]  # ppo_one_base prints a table
            out = subprocess.run([sys.executable, str(HERE / script), *extra, *json_arg], capture_output=True,
                                 text=True,
                                 env={**os.environ, **ENV}, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{script} failed:\n{out.stderr[-4000:]}")
            print(out.stdout, flush=True)
            if json_arg:
                res = json.loads(Path(f.name).read_text())
                body = f"{res['title']}\n\n{res['table']}"
                if "ratios" in res:  # sft_vs_llamafactory.py
                    body += "\n\n" + res["ratios"] + "".join(f"\n- {line}" for line in res["flat"])
                if "overhead" in res:
                    body += (f"\n\nrlhf's overhead in training throughput (CPU time of train()): "
                             f"{res['overhead']:+.1%} (goal: under 5%)")
            else:
                body = "```\n" + out.stdout.strip() + "\n```"
        parts.append(f"### {script}\n\n{body}\n\n_{time.time() - t:.0f} s; load average before {before}, after "
                     f"{load_average()}_")
    header = (f"# Benchmark results\n\nRun {started} with `python "
              f"benchmarks/run_all.py{' --quick' if args.quick else ''}`"
              f" on {info['cpu']} ({info['cores']} cores), {info['threads']} thread per process, torch "
              f"{info['torch']}, "
              f"Python {info['python']}, GPU: {info['gpu'] or 'none'}. Load average (1/5/15 min, as uptime prints it) "
              "at the start: "
              f"{load_start}; other engineers' processes shared the machine.\n")
    anchors = "### rlhf estimate against published figures\n\n" + estimate_anchors()
    Path(args.output).write_text(header + "\n" + "\n\n".join(parts + [anchors]) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
