"""`rlhf sft` against a plain trl SFTTrainer script (benchmarks/plain_trl_sft.py): same model, data and settings.

    OMP_NUM_THREADS=1 python benchmarks/sft_vs_trl.py                 # llama hidden 256 x 4 layers, demo_sft, 40 steps
    python benchmarks/sft_vs_trl.py --hidden 64 --layers 2 --steps 10 --repeats 1    # a quick look

Both train the same random llama (LoRA r 8 / alpha 16 / dropout 0.05 on q_proj,v_proj, fp32, AdamW, cosine, lr 2e-4,
batch 8, max length 256, seed 42, no eval, no checkpoints) on the bundled demo_sft rows. `rlhf sft` runs through its
command line (rlhf.cli); the trl script as a user would write it. Reported (best of --repeats interleaved runs, each
in its own process): training samples/s (by wall and by process CPU time of train()), trained
tokens processed, peak RSS of the process, and -- in a separate run with tensor tracking, which slows it -- the peak
bytes of live tensors during train() (on CUDA: max_memory_allocated, from the timed run). Goal: overhead under 5%.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# noqa: E402
from common import ROOT, best_of, load_average, make_base, md_table, rss_mib, run_child, spy_on_train, write_json

DATA = ROOT / "datasets_registry" / "data" / "demo_sft.jsonl"


def child(args) -> None:
    import trl

    imports = rss_mib()
    rec: dict = {}
    spy_on_train(trl.SFTTrainer, args.track, rec)
    out = str(Path(args.workdir) / f"{args.child}_{args.track}")
    common = dict(max_steps=args.steps, batch=8, lr=2e-4, max_length=256)
    if args.child == "rlhf":
        from rlhf.cli import cli

        cli.main(args=["sft", "--model-name-or-path", args.base, "--dataset", str(DATA), "--output-dir", out,
                       "--overwrite-output-dir", "true", "--max-steps", str(common["max_steps"]),
                       "--per-device-train-batch-size", str(common["batch"]), "--learning-rate", str(common["lr"]),
                       "--max-length", str(common["max_length"]), "--lora-r", "8", "--lora-alpha", "16",
                       "--lora-dropout", "0.05",
                       "--lora-target", "q_proj,v_proj", "--dtype", "float32", "--seed", "42", "--logging-steps", "10",
                       "--save-steps", "100000", "--task-eval-samples", "0", "--template", "own"],
                       standalone_mode=False)
    else:
        sys.argv = ["plain_trl_sft.py", "--model", args.base, "--data", str(DATA), "--output-dir", out,
                    "--max-steps", str(common["max_steps"]), "--batch-size", str(common["batch"]),
                    "--learning-rate", str(common["lr"]), "--max-length", str(common["max_length"])]
        runpy.run_path(str(Path(__file__).with_name("plain_trl_sft.py")), run_name="__main__")
    print(json.dumps({**rec, "peak_rss_mib": rss_mib(), "imports_rss_mib": imports}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    ap.add_argument("--child", choices=["rlhf", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--track", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        base = make_base(Path(tmp) / "base", args.hidden, args.layers)
        best = best_of(args.repeats, ("rlhf", "trl"), key=lambda r: r["train_cpu_s"],
                       run=lambda side: run_child([__file__, "--child", side, "--workdir", tmp, "--base", base,
                                                   "--steps", str(args.steps)]))
        mem = {side: run_child([__file__, "--child", side, "--workdir", tmp, "--base", base, "--steps", "4", "--track"])
               for side in ("rlhf", "trl")}
    a, b = best["rlhf"], best["trl"]
    sps = {s: 8 * args.steps / best[s]["train_wall_s"] for s in best}
    cpu_sps = {s: 8 * args.steps / best[s]["train_cpu_s"] for s in best}
    rows = [
        ["train samples/s (wall)", f"{sps['rlhf']:.2f}", f"{sps['trl']:.2f}", f"{sps['rlhf'] / sps['trl']:.3f}"],
        ["train samples/s (CPU time)", f"{cpu_sps['rlhf']:.2f}", f"{cpu_sps['trl']:.2f}",
         f"{cpu_sps['rlhf'] / cpu_sps['trl']:.3f}"],
        ["non-pad tokens processed", a["num_tokens"], b["num_tokens"],
         f"{a['num_tokens'] / b['num_tokens']:.3f}" if a["num_tokens"] and b["num_tokens"] else "-"],
        ["peak RSS (MiB)", f"{a['peak_rss_mib']:.0f}", f"{b['peak_rss_mib']:.0f}",
         f"{a['peak_rss_mib'] / b['peak_rss_mib']:.3f}"],
        ["peak live tensors in train() (MiB)", f"{mem['rlhf']['train_peak_bytes'] / 2**20:.1f}",
         f"{mem['trl']['train_peak_bytes'] / 2**20:.1f}",
         f"{mem['rlhf']['train_peak_bytes'] / mem['trl']['train_peak_bytes']:.3f}"],
        ["whole process (s)", f"{a['process_s']:.1f}", f"{b['process_s']:.1f}",
         f"{a['process_s'] / b['process_s']:.3f}"],
    ]
    if a.get("cuda_max_allocated_bytes"):
        rows.append(["CUDA max allocated (MiB)", f"{a['cuda_max_allocated_bytes'] / 2**20:.1f}",
                     f"{b['cuda_max_allocated_bytes'] / 2**20:.1f}",
                     f"{a['cuda_max_allocated_bytes'] / b['cuda_max_allocated_bytes']:.3f}"])
    overhead = 1 - cpu_sps["rlhf"] / cpu_sps["trl"]
    title = (f"rlhf sft vs plain trl SFTTrainer: llama hidden {args.hidden} x {args.layers} layers, LoRA r8 q,v, batch "
             "8, "
             f"{args.steps} steps on demo_sft; best of {args.repeats} interleaved runs")
    table = md_table(["", "rlhf sft", "plain trl", "rlhf / trl"], rows)
    print(title + "\n\n" + table + f"\n\nrlhf's training-throughput overhead (CPU time): {overhead:+.1%} (goal: under "
                                   "5%)")
    write_json(args.json, {"title": title, "table": table, "overhead": overhead, "load": [load_before, load_average()],
                           "raw": {"timed": best, "memory": mem}})


if __name__ == "__main__":
    main()
