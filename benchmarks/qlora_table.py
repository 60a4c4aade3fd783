"""The QLoRA paper's comparison in miniature: on the demo task, final eval loss and task metric of full
fine-tuning, LoRA 16-bit, QLoRA int8, QLoRA FP4 and QLoRA NF4 + double quantization, same steps and seed.

    OMP_NUM_THREADS=1 python benchmarks/qlora_table.py                     # pre-trains the demo base first (rlhf pt)
    python benchmarks/qlora_table.py --base runs/demo/pt --steps 200      # an existing base
    python benchmarks/qlora_table.py --pt-steps 50 --steps 20 --eval-samples 16   # a quick look

The claim to check (Dettmers et al. 2023, Tables 3-4): 4-bit QLoRA (NF4 + double quantization) matches 16-bit
LoRA, while FP4 falls a little behind. Here: a tiny llama pre-trained on the bundled corpus (`rlhf pt`), then
`rlhf sft` on demo_sft with each variant, evaluated on demo_sft_eval (eval loss, and the task metric on
--eval-samples held-out prompts, greedy). LoRA variants: r 16, alpha 32, dropout 0.05 on all linear layers (the
paper's placement), lr --lora-lr; full fine-tuning: fp32, lr --full-lr. 16-bit means bf16 weights; the quantized
bases compute in bf16 (bnb_4bit_compute_dtype). One seed: on a model this small, differences of a few points are
within seed noise (the paper averages several seeds); --seeds runs more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, md_table, run_child, write_json  # noqa: E402

VARIANTS = {  # name -> config keys
    "full fine-tuning (fp32)": dict(finetuning_type="full", dtype="float32"),
    "LoRA 16-bit (bf16)": dict(dtype="bfloat16"),
    "QLoRA int8": dict(quantization="8bit", dtype="bfloat16"),
    "QLoRA FP4": dict(quantization="4bit", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                      dtype="bfloat16"),
    "QLoRA NF4 + DQ": dict(quantization="4bit", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           dtype="bfloat16"),
}


def cli_args(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def child(args) -> None:
    from rlhf.cli import cli

    t = time.time()
    cli.main(args=[args.child_stage, *json.loads(args.child_args)], standalone_mode=False)
    print(json.dumps({"seconds": time.time() - t}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="a pre-trained base folder; default: pre-train one with rlhf pt")
    ap.add_argument("--pt-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200, help="SFT steps of every variant")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--eval-samples", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    ap.add_argument("--child-stage", help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_stage:
        return child(args)

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="qlora_table_") as tmp:
        base = args.base
        pt_s = None
        if not base:
            base = str(Path(tmp) / "pt")
            pt_s = run_child([__file__, "--child-stage", "pt", "--child-args", json.dumps(cli_args(
                dict(output_dir=base, max_steps=args.pt_steps, logging_steps=100)))])["seconds"]
        results: dict = {name: [] for name in VARIANTS}
        before = None
        for seed in range(42, 42 + args.seeds):
            for name, keys in VARIANTS.items():
                out = Path(tmp) / f"sft_{len(results[name])}_{list(VARIANTS).index(name)}"
                common = dict(model_name_or_path=base, dataset="demo_sft", eval_dataset="demo_sft_eval", output_dir=out,
                              max_steps=args.steps, per_device_train_batch_size=args.batch, seed=seed,
                              learning_rate=args.full_lr if keys.get("finetuning_type") == "full" else args.lora_lr,
                              lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target="all-linear", max_length=128,
                              task_eval_samples=args.eval_samples, max_new_tokens=8, logging_steps=25,
                              save_steps=100000,
                              eval_steps=args.steps,
                              **({"bnb_4bit_compute_dtype": "bfloat16"} if keys.get("quantization") == "4bit" else {}))
                r = run_child([__file__, "--child-stage", "sft", "--child-args",
                               json.dumps(cli_args({**common, **keys}))])
                m = json.loads((out / "manifest.json").read_text())["metrics"]
                results[name].append({"eval_loss": m.get("eval_loss"), "task": m.get("task_metric_after"),
                                      "seconds": r["seconds"]})
                before = m.get("task_metric_before") if before is None else before

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else float("nan")

    ref = mean([r["eval_loss"] for r in results["LoRA 16-bit (bf16)"]])
    rows = []
    for name, rs in results.items():
        loss, task = mean([r["eval_loss"] for r in rs]), mean([r["task"] for r in rs])
        rows.append([name, f"{loss:.4f}", f"{loss - ref:+.4f}", f"{task:.3f}",
                     f"{mean([r['seconds'] for r in rs]):.0f}"])
    title = ("QLoRA's comparison in miniature: demo task, tiny llama pre-trained "
             f"{'here (' + str(args.pt_steps) + ' pt steps)' if pt_s else 'at ' + base}; "
             f"SFT {args.steps} steps x batch {args.batch}, seed{'s' if args.seeds > 1 else ''} "
             f"42{'..' + str(41 + args.seeds) if args.seeds > 1 else ''}; "
             f"task metric on {args.eval_samples} held-out prompts (base before SFT: {before})")
    table = md_table(["variant", "eval loss", "vs LoRA 16-bit", "task metric", "run s"], rows)
    print(title + "\n\n" + table)
    write_json(args.json, {"title": title, "table": table, "load": [load_before, load_average()], "raw": results,
                           "task_before": before})


if __name__ == "__main__":
    main()
