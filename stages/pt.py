"""`rlhf pt`: pre-train a tiny causal LM from scratch on a text corpus (the demo's base model).

Recipe: read the corpus -> train a byte-level BPE tokenizer on it (with a chatml chat
template) -> build a small model of the chosen architecture from a config -> causal-LM
training on random windows of the concatenated corpus (nanoGPT style) -> save model and
tokenizer (safetensors) with metrics and a training log into ``output_dir``, atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

from rlhf.config import DataConfig, TrainConfig, fields_of, opt
from rlhf.data import DataError

ARCHS = ["llama", "gpt2", "gpt_neox", "bloom", "qwen2", "mistral"]


def _same(cls, name: str, default=dataclasses.MISSING):
    """Reuse field ``name`` of ``cls`` (its help and choices), optionally with another default."""
    f = fields_of(cls)[name]
    meta = dict(f.metadata)
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return opt(default, meta.pop("help"), **meta)


@dataclass
class PTConfig:
    """Pre-training from scratch: data, optimisation, and the model's size."""

    # data
    dataset: list[str] = _same(DataConfig, "dataset", ["demo_corpus"])
    registry_file: str | None = _same(DataConfig, "registry_file")
    num_samples: int | None = _same(DataConfig, "num_samples")
    val_size: float = _same(DataConfig, "val_size", 0.05)
    # training
    output_dir: str = _same(TrainConfig, "output_dir", "runs/demo/pt")
    seed: int = _same(TrainConfig, "seed")
    learning_rate: float = _same(TrainConfig, "learning_rate", 3e-3)
    num_train_epochs: float = _same(TrainConfig, "num_train_epochs")
    max_steps: int = _same(TrainConfig, "max_steps")
    per_device_train_batch_size: int = _same(TrainConfig, "per_device_train_batch_size", 32)
    per_device_eval_batch_size: int = _same(TrainConfig, "per_device_eval_batch_size", 32)
    lr_scheduler_type: str = _same(TrainConfig, "lr_scheduler_type")
    warmup_ratio: float = _same(TrainConfig, "warmup_ratio", 0.05)
    warmup_steps: int = _same(TrainConfig, "warmup_steps")
    weight_decay: float = _same(TrainConfig, "weight_decay", 0.01)
    max_grad_norm: float = _same(TrainConfig, "max_grad_norm")
    logging_steps: int = _same(TrainConfig, "logging_steps")
    report_to: list[str] = _same(TrainConfig, "report_to")
    overwrite_output_dir: bool = _same(TrainConfig, "overwrite_output_dir")
    # the model
    arch: str = opt("llama", "Architecture of the new model.", choices=ARCHS)
    split_digits: bool = opt(True, "Tokenize numbers digit by digit, as Llama and Qwen2 do (demo, 64x2 model: LoRA SFT "
                                   "held-out metric 0.88 with it, 0.65 without).")
    vocab_size: int = opt(512, "Size of the byte-level BPE vocabulary trained on the corpus (at least 259: bytes and "
                               "special tokens).")
    hidden_size: int = opt(128, "Width of the model.")
    num_layers: int = opt(2, "Number of transformer blocks.")
    num_heads: int = opt(4, "Attention heads (must divide hidden_size).")
    block_size: int = opt(64, "Tokens per training window (windows are cut from the concatenated corpus).")
    max_position_embeddings: int = opt(256, "Longest sequence the model can take (later stages' prompt + response must "
                                            "fit).")

    def validate(self):
        from rlhf.config import ConfigError

        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; pick "
                              "sizes that divide")
        if self.vocab_size < 259:
            raise ConfigError(f"vocab_size {self.vocab_size} is too small: the 256 bytes and 3 special tokens need "
                              "259; use 512 or more")
        if self.block_size > self.max_position_embeddings:
            raise ConfigError(f"block_size {self.block_size} exceeds max_position_embeddings "
                              f"{self.max_position_embeddings}; raise the latter")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")


def load_texts(cfg: PTConfig) -> list[str]:
    """The corpus lines of ``cfg.dataset`` (registry names or .jsonl/.txt paths)."""
    from rlhf.data import load_examples

    rows = load_examples(cfg.dataset, kind="text", registry_file=cfg.registry_file, num_samples=cfg.num_samples,
                         seed=cfg.seed)
    return [r["text"] for r in rows]


def split_digits(tokenizer) -> None:
    """Make ``tokenizer`` cut numbers into single digits (merges across digits then never apply)."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), tokenizer.backend_tokenizer.pre_tokenizer]
    )


def _pack(tokenizer, texts: list[str]):
    """One long 1-D tensor of token ids: each text followed by the end-of-text token."""
    import torch

    ids = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _windows(data, starts, block: int):
    import torch

    x = torch.stack([data[s : s + block] for s in starts])
    y = torch.stack([data[s + 1 : s + 1 + block] for s in starts])
    return x, y


def end_texts_with_end_of_turn(model, tokenizer, end_of_turn: str = "<|im_end|>") -> None:
    """Swap the LM head's rows of eos and ``end_of_turn``: the model then ends a text with the token that
    ends a chat turn.

    The corpus never holds ``end_of_turn``, so its row was only ever pushed down, and a LoRA adapter
    cannot train the head. Measured on the demo (LoRA SFT, 300 steps): without the swap the SFT model
    ends greedy answers with eos, but sampled ones (temperature 1) run on past the answer (held-out
    metric 0.03, SFT loss 1.2); with it, 0.90 sampled and loss 0.03. eos stays the document separator on
    the input side and the padding token (for tied embeddings the input rows swap too).
    """
    import torch

    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    eos = tokenizer.eos_token_id
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[[eos, eot]] = head[[eot, eos]].clone()


def evaluate(model, data, block: int, batch_size: int) -> float:
    """Mean next-token loss over consecutive windows of ``data``."""
    import torch

    starts = list(range(0, len(data) - block - 1, block))
    if not starts:
        return float("nan")
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y = _windows(data, starts[i : i + batch_size], block)
            logits = model(input_ids=x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    model.train(was_training)
    return total / n


def run(cfg: PTConfig) -> str:
    """Pre-train per ``cfg``; return the finished output folder."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    from rlhf.config import to_dict
    from rlhf.data import fingerprint, held_out_split
    from rlhf.config import ConfigError
    from rlhf.dist import process_state
    from rlhf.manifest import finish_output, prepare_output
    from rlhf.templates import TEMPLATES
    from rlhf.tiny import tiny_config, train_tokenizer
    from rlhf.train_utils import LOG_FILE, TRACKER_DIR, DivergedError, open_trackers, plot_curves

    started = time.time()
    if process_state().num_processes > 1:
        raise ConfigError("rlhf pt trains its small base in one process; run it without accelerate launch/torchrun "
                          "(in a pipeline, pt always runs in the pipeline's own process)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # data: tokenizer trained on the training lines only; held-out lines measure eval loss
    texts = load_texts(cfg)
    held, rest = held_out_split(len(texts), cfg.val_size, cfg.seed)
    eval_texts, train_texts = [texts[i] for i in held], [texts[i] for i in rest]
    if not train_texts:
        raise DataError(f"dataset {cfg.dataset}: no training lines left (got {len(texts)} lines, val_size "
                        f"{cfg.val_size})")
    # (the data is checked first)
    work = prepare_output(cfg.output_dir, overwrite=cfg.overwrite_output_dir, requested=to_dict(cfg))
    tokenizer = train_tokenizer(train_texts, str(work), vocab_size=cfg.vocab_size)
    if cfg.split_digits:
        split_digits(tokenizer)
    tokenizer.chat_template = TEMPLATES["chatml"]
    train_ids, eval_ids = _pack(tokenizer, train_texts), _pack(tokenizer, eval_texts)
    block = cfg.block_size
    if len(train_ids) <= block + 1:
        raise DataError(f"dataset {cfg.dataset}: {len(train_ids)} tokens, fewer than one window of block_size {block}; "
                        "lower block_size")

    # model
    config = tiny_config(cfg.arch, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                         num_heads=cfg.num_heads, max_positions=cfg.max_position_embeddings, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    # optimisation
    bs = cfg.per_device_train_batch_size
    epoch_steps = math.ceil(cfg.num_train_epochs * len(train_ids) / (bs * block))
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, epoch_steps)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.learning_rate, betas=(0.9, 0.95))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    sched = get_scheduler(cfg.lr_scheduler_type, optim, num_warmup_steps=warmup, num_training_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows, running = [], []
    t0 = time.time()
    log = open(work / LOG_FILE, "w")
    tracked = open_trackers(cfg, work / TRACKER_DIR, "pt", to_dict(cfg))  # the rows' names, under runs/pt
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - block - 1, (bs,), generator=gen).tolist()
        x, y = _windows(train_ids, starts, block)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            log.close()
            raise DivergedError(f"pt: loss is {loss.item()} at step {step}; lower learning_rate (now "
                                f"{cfg.learning_rate})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step == 1 or step % cfg.logging_steps == 0 or step == steps:
            row = {"step": step, "loss": sum(running) / len(running), "learning_rate": sched.get_last_lr()[0],
                   "tokens_per_s": round(step * bs * block / (time.time() - t0), 1)}
            if step == steps and len(eval_ids) > block + 1:
                row["eval_loss"] = evaluate(model, eval_ids, block, cfg.per_device_eval_batch_size)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            for t in tracked:
                t.log({k: v for k, v in row.items() if k != "step"}, step=step)
            running = []
    log.close()
    for t in tracked:
        t.finish()

    # save: model + tokenizer (chatml template; texts end with <|im_end|>), metrics, plot
    end_texts_with_end_of_turn(model, tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(work), safe_serialization=True)
    tokenizer.save_pretrained(str(work))
    metrics = {"train_loss_first": rows[0]["loss"], "train_loss_last": rows[-1]["loss"],
               "eval_loss": rows[-1].get("eval_loss"), "steps": steps, "num_parameters": n_params,
               "train_tokens": len(train_ids), "train_seconds": round(time.time() - t0, 1)}
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(rows, ["loss", "learning_rate"], work / "training_curves.png",
                f"pt: {cfg.arch}, {n_params / 1e6:.2f}M parameters")
    out = finish_output(work, cfg.output_dir, stage="pt", config=to_dict(cfg), base_model=f"scratch:{cfg.arch}",
                        datasets=fingerprint(cfg.dataset, cfg.registry_file), metrics=metrics, started=started)
    return str(out)
