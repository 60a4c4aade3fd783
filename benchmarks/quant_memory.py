"""Peak memory of QLoRA 4-bit vs 8-bit vs 16-bit LoRA on one model, against `rlhf estimate`.

    OMP_NUM_THREADS=1 python benchmarks/quant_memory.py     # llama hidden 1024 x 4 layers (vocab 512), batch 1 x 128
    python benchmarks/quant_memory.py --hidden 256 --layers 2 --steps 2

Each variant loads the model through rlhf's loader (as `rlhf sft` does: LoRA r 8 on q_proj,v_proj, no dropout) in
its own process and runs --steps training steps (forward, backward, AdamW step). Memory is the peak bytes of live
tensors (rlhf.estimate.measure_peak: on CPU every tensor alive, on CUDA max_memory_allocated), next to the
estimate for the same settings. On CPU there is no autocast: LoRA 16-bit runs in bf16; the quantized bases compute
in fp32 and, through prepare_model_for_kbit_training, keep fp32 hidden states (the estimate is given act_bytes=4).
On CUDA every variant runs under bf16 autocast with a bf16 compute dtype, as `bf16: true` does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, make_base, md_table, rss_mib, run_child, write_json  # noqa: E402

VARIANTS = {  # name -> (estimate method, loader keys)
    "LoRA 16-bit (bf16)": ("lora", dict(quantization="none", dtype="bfloat16")),
    "QLoRA 8-bit": ("qlora_8bit", dict(quantization="8bit")),
    "QLoRA 4-bit NF4": ("qlora_4bit", dict(quantization="4bit", bnb_4bit_use_double_quant=False)),
    "QLoRA 4-bit NF4 + DQ": ("qlora_4bit", dict(quantization="4bit", bnb_4bit_use_double_quant=True)),
}


def child(args) -> None:
    import contextlib

    import torch

    from rlhf import estimate as E
    from rlhf.config import ModelConfig
    from rlhf.loader import AdapterSpec, load_model

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    method, keys = VARIANTS[args.child]
    if keys["quantization"] == "4bit":
        keys = {**keys, "bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32"}
    cfg = ModelConfig(model_name_or_path=args.base, lora_r=8, lora_target=["q_proj", "v_proj"], lora_dropout=0.0,
                      **keys)
    model = load_model(cfg, adapters=[AdapterSpec("default", trainable=True)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (args.batch, args.seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def steps():
        for _ in range(args.steps):
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps()  # warm-up (and optimizer state), untimed
    t = time.perf_counter()
    steps()
    if cuda:
        torch.cuda.synchronize()
    tok_s = args.steps * args.batch * args.seq / (time.perf_counter() - t)
    m = E.measure_peak(steps)
    quant_fp32_hidden = method.startswith("qlora") and not cuda
    setup = E.Setup(method=method, batch_size=args.batch, seq_len=args.seq, lora_r=8, lora_target=["q_proj", "v_proj"],
                    lora_dropout=cfg.lora_dropout,
                    double_quant=keys.get("bnb_4bit_use_double_quant", True), device="cuda" if cuda else "cpu",
                    act_bytes=4 if quant_fp32_hidden else None)
    est = E.estimate(E.load_shape(args.base), setup)
    print(json.dumps({"peak": m.peak, "start": m.start, "est_peak": est.peak, "est_weights": est.weights,
                      "tokens_per_s": tok_s, "peak_rss_mib": rss_mib(), "cuda": cuda}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="write the results here (benchmarks/run_all.py)")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="quant_memory_") as tmp:
        base = make_base(Path(tmp) / "base", args.hidden, args.layers, heads=8)
        res = {name: run_child([__file__, "--child", name, "--base", base, "--hidden", str(args.hidden), "--layers",
                                str(args.layers),
                                "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
                                str(args.steps)]) for name in VARIANTS}
    ref = res["LoRA 16-bit (bf16)"]
    mib = 2**20
    rows = [[name, f"{r['start'] / mib:.1f}", f"{r['est_weights'] / mib:.1f}", f"{r['peak'] / mib:.1f}",
             f"{r['est_peak'] / mib:.1f}",
             f"{r['est_peak'] / r['peak']:.3f}", f"{r['peak'] / ref['peak']:.2f}", f"{r['tokens_per_s']:.0f}"] for name,
             r in res.items()]
    where = "CUDA max_memory_allocated" if ref["cuda"] else "CPU live tensors"
    title = (f"Peak training memory by base precision ({where}): llama hidden {args.hidden} x {args.layers} layers, "
             "vocab 512, "
             f"LoRA r8 q,v, batch {args.batch} x {args.seq} tokens, AdamW")
    table = md_table(["variant", "weights MiB", "est. weights", "peak MiB", "est. peak", "est. / measured",
                      "peak / 16-bit",
                      "train tokens/s"], rows)
    print(title + "\n\n" + table)
    write_json(args.json, {"title": title, "table": table, "load": [load_before, load_average()], "raw": res})


if __name__ == "__main__":
    main()
