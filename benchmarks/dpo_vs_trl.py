"""`rlhf dpo` (the reference is the frozen SFT adapter on the policy's own base: one copy of the weights) vs trl's
DPOTrainer given a separate reference model (the SFT model merged, a second copy): CPU seconds per step and peak
RSS.

    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py                       # ~20M-param llama, fp32, CPU
    python benchmarks/dpo_vs_trl.py --hidden 1024 --layers 8 --steps 2 8
    python benchmarks/dpo_vs_trl.py --hidden 4096 --layers 4 --heads 32 --steps 1 2 --gradient-checkpointing 1

The same base, SFT and RM parents as benchmarks/grpo_vs_trl.py (the RM unused here), the demo preference pairs
(demo_pref), batch size, max_length, steps, learning rate and beta on both sides, no evaluation or checkpoints on
trl's side. CPU per step is (CPU(S2) - CPU(S1)) / (S2 - S1) of the whole child process, peak RSS the S2 child's
VmHWM, "over imports" subtracts a child that only imports the libraries (see grpo_vs_trl.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_vs_trl import add_common_args, child, compare  # noqa: E402  (sets ENV)

PAIRS = "demo_pref"


def child_ours(a, parents: dict) -> dict:
    import shutil

    from rlhf.config import load_config
    from rlhf.stages import dpo

    out = Path(a.root) / f"dpo_ours_{a.child_steps}"
    shutil.rmtree(out, ignore_errors=True)
    dpo.run(load_config(dpo.DPOConfig, None, dict(
        sft_dir=parents["sft"], dataset=PAIRS, max_length=a.max_length, per_device_train_batch_size=a.batch,
        max_steps=a.child_steps, learning_rate=a.lr, beta=a.beta, loss_type="sigmoid", eval_samples=0,
        save_steps=10**6, logging_steps=1, seed=a.seed, output_dir=str(out),
        gradient_checkpointing=bool(a.gradient_checkpointing))))
    return {}


def child_trl(a, parents: dict) -> dict:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf.data import load_examples
    from rlhf.loader import load_tokenizer

    tok = load_tokenizer(parents["sft"])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parents["base"]), parents["sft"],
                                       is_trainable=True)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parents["base"]),
                                    parents["sft"]).merge_and_unload().eval()
    rows = load_examples([PAIRS], kind="preference")
    ds = Dataset.from_list([{"prompt": e["messages"], "chosen": [{"role": "assistant", "content": e["chosen"]}],
                             "rejected": [{"role": "assistant", "content": e["rejected"]}]} for e in rows])
    args = DPOConfig(output_dir=str(Path(a.root) / "dpo_trl_out"), per_device_train_batch_size=a.batch,
                     max_length=a.max_length, max_steps=a.child_steps, learning_rate=a.lr, beta=a.beta,
                     loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     bf16=False, seed=a.seed, disable_dropout=True,
                     gradient_checkpointing=bool(a.gradient_checkpointing),
                     lr_scheduler_type="linear")
    DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok).train()
    return {}


def child_imports(a, parents: dict) -> dict:
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from trl import DPOTrainer  # noqa: F401

    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, steps=[2, 8])
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--gradient-checkpointing", type=int, default=0, help="1: gradient checkpointing on both sides")
    a = p.parse_args()
    if a.child:
        return child(a, {"ours": child_ours, "trl": child_trl, "imports": child_imports})
    compare(__file__, a, ("batch", "max_length", "beta", "lr", "gradient_checkpointing"))


if __name__ == "__main__":
    main()
