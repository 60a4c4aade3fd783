"""A plain trl SFTTrainer script: the baseline that `rlhf sft` is compared with (benchmarks/sft_vs_trl.py).

What a user writes without rlhf: read alpaca rows, turn them into prompt/completion conversations, LoRA through
peft_config, train. Every setting is a flag, so the comparison can pass the same values to both.

    python benchmarks/plain_trl_sft.py --model MODEL_DIR --data rows.jsonl --output-dir out --max-steps 40
"""
from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (its tokenizer must have a chat template)")
    ap.add_argument("--data", required=True, help="JSONL rows with instruction, input, output")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lora-target", default="q_proj,v_proj")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    data = Dataset.from_list([
        {"prompt": [{"role": "user",
                     "content": (r["instruction"] + "\n" + r["input"]) if r.get("input") else r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["output"]}]}
        for r in rows
    ])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.0, weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, max_length=args.max_length, packing=args.packing,
        bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target.split(","), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
