"""What the Trainer-based stages (sft, rm) share: TrainingArguments from our config, a JSONL log
that also stops on a NaN/inf loss, and the final curves plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

LOG_FILE = "train_log.jsonl"


def trainer_kwargs(cfg, work: Path, has_eval: bool) -> dict:
    """TrainingArguments keys from our TrainConfig; checkpoints go to ``work/checkpoints``."""
    import torch

    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    return dict(
        output_dir=str(work / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": cfg.gradient_checkpointing_reentrant} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def log_callback(work: Path):
    """A TrainerCallback writing every log to ``work/train_log.jsonl``; a NaN/inf loss stops the run."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {}, step=state.global_step, epoch=state.epoch)
            if state.is_world_process_zero:
                with open(work / LOG_FILE, "a") as f:
                    f.write(json.dumps(logs) + "\n")
            for k in ("loss", "eval_loss"):
                if k in logs and not math.isfinite(float(logs[k])):
                    raise FloatingPointError(
                        f"{k} is {logs[k]} at step {state.global_step}; stopping. The last good checkpoint stays in "
                        f"{work / 'checkpoints'} (resume with --resume true after lowering the learning rate)"
                    )

    return JsonlLog()


def read_log(work: Path) -> list[dict]:
    p = Path(work) / LOG_FILE
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def plot_curves(rows: list[dict], keys: list[str], png: Path, title: str) -> None:
    """One panel per key that appears in ``rows`` (x: step), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def loss_summary(rows: list[dict]) -> dict:
    """First and last training loss, last eval loss, from the log."""
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    out = {}
    if train:
        out.update(train_loss_first=train[0], train_loss_last=train[-1])
    if evals:
        out.update(eval_loss_first=evals[0], eval_loss=evals[-1])
    return out


def load_train_eval(cfg, kind: str) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out examples of the config's datasets, and their fingerprints.

    Held-out: ``eval_dataset`` when given, else ``val_size`` (a share < 1 or a count) split off the
    training rows with the config's seed.
    """
    import random

    from rlhf.data import fingerprint, load_examples

    kw = dict(kind=kind, registry_file=cfg.registry_file, num_samples=cfg.num_samples, skip_invalid=cfg.skip_invalid_rows, seed=cfg.seed)
    train = load_examples(cfg.dataset, **kw)
    evals = load_examples(cfg.eval_dataset, **kw) if cfg.eval_dataset else []
    if not cfg.eval_dataset and cfg.val_size > 0:
        n = int(cfg.val_size if cfg.val_size >= 1 else round(cfg.val_size * len(train)))
        if not 0 < n < len(train):
            raise ValueError(f"val_size {cfg.val_size} leaves no training or no eval rows out of {len(train)}")
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[:n])
        evals = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    prints = fingerprint(cfg.dataset + cfg.eval_dataset, cfg.registry_file)
    return train, evals, prints


def dataset_metric(names: list[str], registry_file: str | None) -> str | None:
    """The checkable metric a registry entry declares (``metric:``), if any of ``names`` has one."""
    from rlhf.data import load_registry

    reg = load_registry(registry_file)
    for n in names:
        if isinstance(reg.get(n), dict) and reg[n].get("metric"):
            return reg[n]["metric"]
    return None
