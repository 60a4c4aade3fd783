"""`rlhf sft` with packing against without, on the bundled demo_sft data: non-pad tokens per second.

    OMP_NUM_THREADS=1 python benchmarks/packing.py               # llama hidden 256 x 4 layers, batch 8, max length 256
    python benchmarks/packing.py --hidden 64 --layers 2 --steps 5 --repeats 1

The demo rows are short (tens of tokens) against max_length 256: without packing each batch is padded to its
longest row; with packing (trl's best-fit packing, padding-free) rows share sequences. Same steps and batch size,
so the packed run also sees more tokens; the comparison is trained (non-pad) tokens per second of train(), best of
--repeats interleaved runs, each in its own process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# noqa: E402
from common import ROOT, best_of, load_average, make_base, md_table, rss_mib, run_child, spy_on_train, write_json

DATA = ROOT / "datasets_registry" / "data" / "demo_sft.jsonl"


def child(args) -> None:
    import transformers

    from rlhf.cli import cli

    rec: dict = {}
    spy_on_train(transformers.Trainer, False, rec)
    cli.main(args=["sft", "--model-name-or-path", args.base, "--dataset", str(DATA), "--output-dir",
                   str(Path(args.workdir) / args.child),
                   "--overwrite-output-dir", "true", "--max-steps", str(args.steps), "--per-device-train-batch-size",
                   "8",
                   "--max-length", "256", "--packing", "true" if args.child == "packed" else "false", "--dtype",
                   "float32",
                   "--logging-steps", str(args.steps), "--save-steps", "100000", "--task-eval-samples", "0"],
                   standalone_mode=False)
    print(json.dumps({**rec, "peak_rss_mib": rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    ap.add_argument("--child", choices=["packed", "padded"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="packing_") as tmp:
        base = make_base(Path(tmp) / "base", args.hidden, args.layers)

        def run(side: str) -> dict:
            r = run_child([__file__, "--child", side, "--workdir", tmp, "--base", base, "--steps", str(args.steps)])
            return dict(r, tok_s=r["num_tokens"] / r["train_wall_s"], tok_cpu_s=r["num_tokens"] / r["train_cpu_s"])

        best = best_of(args.repeats, ("packed", "padded"), run, key=lambda r: -r["tok_cpu_s"])
    p, u = best["packed"], best["padded"]
    rows = [["non-pad tokens/s (wall)", f"{p['tok_s']:.0f}", f"{u['tok_s']:.0f}", f"{p['tok_s'] / u['tok_s']:.2f}"],
            ["non-pad tokens/s (CPU time)", f"{p['tok_cpu_s']:.0f}", f"{u['tok_cpu_s']:.0f}",
             f"{p['tok_cpu_s'] / u['tok_cpu_s']:.2f}"],
            ["non-pad tokens processed", f"{p['num_tokens']:.0f}", f"{u['num_tokens']:.0f}",
             f"{p['num_tokens'] / u['num_tokens']:.2f}"],
            ["s per step (wall)", f"{p['train_wall_s'] / args.steps:.3f}", f"{u['train_wall_s'] / args.steps:.3f}",
             f"{p['train_wall_s'] / u['train_wall_s']:.2f}"],
            ["peak RSS (MiB)", f"{p['peak_rss_mib']:.0f}", f"{u['peak_rss_mib']:.0f}",
             f"{p['peak_rss_mib'] / u['peak_rss_mib']:.2f}"]]
    if p.get("cuda_max_allocated_bytes"):
        rows.append(["CUDA max allocated (MiB)", f"{p['cuda_max_allocated_bytes'] / 2**20:.1f}",
                     f"{u['cuda_max_allocated_bytes'] / 2**20:.1f}",
                     f"{p['cuda_max_allocated_bytes'] / u['cuda_max_allocated_bytes']:.2f}"])
    title = (f"SFT with packing vs without: llama hidden {args.hidden} x {args.layers} layers, batch 8, max length "
             "256, "
             f"{args.steps} steps on demo_sft; best of {args.repeats} interleaved runs")
    table = md_table(["", "packing", "no packing", "packing / none"], rows)
    print(title + "\n\n" + table)
    write_json(args.json, {"title": title, "table": table, "speedup": p["tok_cpu_s"] / u["tok_cpu_s"],
                           "load": [load_before, load_average()], "raw": best})


if __name__ == "__main__":
    main()
