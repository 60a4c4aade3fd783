"""`rlhf sft`: supervised fine-tuning.

Recipe: config -> tokenizer + chat template -> data (registry) tokenized with assistant-only labels
-> model through the one loader (LoRA/QLoRA, full or freeze) -> train -> save the stage folder
(adapter, tokenizer, manifest, log, plot).

The data arrives tokenized and masked (labels -100 off the trained tokens), so training is a transformers Trainer
with the per-token loss over those labels (across the accumulated batch), the output layer run only where a trained
token is predicted (rlhf.evaluate.logits_at_labels: prompt and padding positions get no logits); token accuracy is
measured only on the steps that log it, and the held-out loss is rlhf.evaluate.lm_loss, the per-token loss that
`rlhf eval` reports. trl's SFTTrainer computed entropy and accuracy over every position of every step (docs/sft.md).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, opt
from rlhf.data import DataError

log = logging.getLogger("rlhf")


@dataclass
class SFTConfig(ModelConfig, DataConfig, TrainConfig):
    train_on_prompt: bool = opt(False, "Also train on prompt (user/system) tokens; default: assistant tokens only.")
    packing: bool = opt(False, "Pack several examples into each max_length sequence (trl's best-fit packing; "
                               "padding-free batches, each example attends only to itself).")
    task_eval_samples: int = opt(64, "Held-out prompts scored with the dataset's checkable metric before and after "
                                     "training (0: off).")
    max_new_tokens: int = opt(32, "Tokens generated per held-out prompt for the task metric.")
    logits_at_labels_only: bool = opt(True, "Run the output layer only at positions that predict a trained token "
                                            "(prompt and padding positions get no logits: less time and memory; "
                                            "false: every position's, for a model whose forward reshapes them).")

    def validate(self):
        if not self.dataset:
            raise ConfigError("sft: no dataset given; set `dataset:` (a registry name or a file)")


def tokenize(examples: list[dict], tokenizer, cfg: SFTConfig):
    """Examples -> a datasets.Dataset of input_ids/labels; drops (and counts) rows with nothing to train."""
    from datasets import Dataset

    from rlhf.templates import encode_sft

    rows = [encode_sft(tokenizer, e["messages"], cfg.max_length, cfg.train_on_prompt) for e in examples]
    kept = [{"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in rows if r and any(l != -100 for l in r["labels"])]
    if len(kept) < len(rows):
        log.warning("%d of %d examples have no trainable token left after truncation to max_length=%d; skipped",
                    len(rows) - len(kept), len(rows), cfg.max_length)
    if not kept:
        raise DataError(f"sft: no example has a trainable (assistant) token within max_length={cfg.max_length}; raise "
                        "max_length (a long chat template or system prompt takes tokens too)")
    return Dataset.from_list(kept)


def collator(tokenizer, packing: bool):
    """Right padding to the batch's longest row (input ids with the pad token, labels with -100); packed rows become
    one padding-free sequence with position ids restarting at each example (trl's collator)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=packing)


def trainer_class(lm_loss_rows: list[dict], tokenizer, cfg: SFTConfig):
    """A transformers Trainer whose training loss is the per-token loss of the trained (label != -100) tokens, with
    the output layer run only at the positions that predict them (rlhf.evaluate.logits_at_labels; off: the model's
    own loss over full logits, the same number), with the token accuracy
    and tokens seen logged on logging steps only, and whose evaluation is the per-token held-out loss of
    ``lm_loss_rows`` (rlhf.evaluate.lm_loss: one definition for the manifest, the log and `rlhf eval`)."""
    import torch
    from transformers import Trainer

    from rlhf import evaluate

    class SFTTrainer(Trainer):
        def __init__(self, *a, **kw):
            if cfg.logits_at_labels_only:  # the Trainer calls the model without labels, then this (its loss scaling
                # over accumulated batches and processes kept)
                kw["compute_loss_func"] = lambda out, labels, num_items_in_batch=None: evaluate.label_nll(
                    out.logits, labels, num_items_in_batch)
            super().__init__(*a, **kw)
            self.counts = torch.zeros(3, dtype=torch.long)  # tokens seen, right and scored next-token guesses

        def logging_step(self) -> bool:
            step = self.state.global_step + 1
            return (step == 1 and self.args.logging_first_step) or step % max(self.state.logging_steps, 1) == 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            labels = inputs["labels"]
            with evaluate.logits_at_labels(model, labels) if cfg.logits_at_labels_only else contextlib.nullcontext():
                loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            logits = out.logits if cfg.logits_at_labels_only else out.logits[:, :-1][labels[:, 1:] != -100]
            if model.training:  # summed on the device, read (one sync) when logged
                counts = self.counts = self.counts.to(loss.device)
                mask = inputs.get("attention_mask")
                counts[0] += mask.sum() if mask is not None else inputs["input_ids"].numel()
                if self.logging_step():
                    with torch.no_grad():
                        counts[1] += (logits.argmax(-1) == labels[:, 1:][labels[:, 1:] != -100]).sum()
                        counts[2] += logits.shape[0]
            return (loss, out) if return_outputs else loss

        def log(self, logs, *a, **kw):
            if "loss" in logs:  # a training row: every process is here (Trainer logs on all of them)
                tokens, right, scored = self.accelerator.reduce(self.counts.clone(), reduction="sum").tolist()
                logs["num_tokens"] = tokens
                if scored:
                    logs["mean_token_accuracy"] = right / scored
                self.counts[1:] = 0
            super().log(logs, *a, **kw)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            model, was_training = self.model, self.model.training
            model.eval()
            try:
                loss, count = evaluate.lm_loss(model, tokenizer, lm_loss_rows, cfg.max_length,
                                               cfg.per_device_eval_batch_size, cfg.logits_at_labels_only)
            finally:
                model.train(was_training)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": count}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return SFTTrainer


def run(cfg: SFTConfig) -> str:
    from transformers import TrainingArguments, set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import pack_dataset

    from rlhf import evaluate
    from rlhf.config import to_dict
    from rlhf.dist import launch_info, process_state
    from rlhf.loader import (AdapterSpec, check_lora_targets, inherit_quantization, load_model, load_tokenizer,
                             trainable_dtypes_kept)
    from rlhf.manifest import finish_output, prepare_output
    from rlhf.templates import apply_template
    from rlhf.train_utils import (dataset_metric, load_train_eval, log_callback, loss_summary, metrics_before,
                                  plot_curves, read_log, resume_point, train_from, trainer_kwargs)

    started, requested, main = time.time(), to_dict(cfg), process_state().is_main_process
    set_seed(cfg.seed)
    inherit_quantization(cfg, None)  # auto: none (sft has no parent)

    # --- data (checked before the working folder is made: a failed start leaves none)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    cfg.template = apply_template(tokenizer, cfg.template)
    train, evals, fingerprints = load_train_eval(cfg, kind="sft")
    train_ds = tokenize(train, tokenizer, cfg)
    eval_ds = tokenize(evals, tokenizer, cfg) if evals else None
    log.info("sft: %d training and %d eval examples, template %s", len(train_ds), len(evals), cfg.template)
    if cfg.finetuning_type == "lora":
        check_lora_targets(cfg)
    work = prepare_output(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, requested=requested)

    # --- model (the trainer's arguments first: under a DeepSpeed ZeRO-3 launch they make the loader shard the
    # weights over the processes while they load)
    args = TrainingArguments(**trainer_kwargs(cfg, work, has_eval=eval_ds is not None), remove_unused_columns=False)
    adapters = [AdapterSpec("default", trainable=True)] if cfg.finetuning_type == "lora" else []
    model = load_model(cfg, head="lm", adapters=adapters, for_training=True)
    zero3 = is_deepspeed_zero3_enabled()

    metric = dataset_metric(cfg.eval_dataset or cfg.dataset, cfg.registry_file) if evals else None
    task_rows = evals[: cfg.task_eval_samples]

    def task_score(when: str) -> dict:  # the metric's numbers (task_metric_<when>, ...) on greedy held-out answers,
        # by the main process (all of them under ZeRO-3)
        if not metric or not task_rows:
            return {f"task_metric_{when}": None}
        if zero3 and when == "before":
            log.info("sft: task metric before training not measured under ZeRO-3 (the weights stay sharded until "
                     "training starts)")
            return {f"task_metric_{when}": None}
        if not main and not zero3:  # under ZeRO-3 every process generates (the layers are gathered in step)
            return {}
        return evaluate.task_metrics_of(model, tokenizer, task_rows, metric, cfg, when)

    resume_from = resume_point(work, cfg.resume)
    metrics = metrics_before(work, resume_from, lambda: task_score("before"), main)  # a resumed run: as it logged it

    # --- train
    if cfg.packing:
        train_ds = pack_dataset(train_ds, cfg.max_length, strategy="bfd")
    with trainable_dtypes_kept(model):
        trainer = trainer_class(evals, tokenizer, cfg)(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=collator(tokenizer, cfg.packing), processing_class=tokenizer,
            callbacks=[log_callback(work)])
    train_from(trainer, resume_from)
    step = trainer.state.global_step
    if eval_ds is not None and not any(r.get("step") == step and "eval_loss" in r for r in read_log(work)):
        trainer.evaluate()  # the final eval loss, unless the schedule just logged it

    # --- save (the main process writes; the others wait for the folder to be finished)
    trainer.save_model(str(work))  # the adapter (or full weights) at the folder root
    after = task_score("after")
    if not main:
        process_state().wait_for_everyone()
        return cfg.output_dir
    metrics.update(loss_summary(read_log(work)), **after)
    tokenizer.save_pretrained(str(work))
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    plot_curves(read_log(work), ["loss", "eval_loss", "learning_rate", "grad_norm"], work / "training_curves.png",
                "sft")
    log.info("sft metrics: %s", {k: v for k, v in metrics.items() if v is not None})
    out = finish_output(work, cfg.output_dir, stage="sft", config=to_dict(cfg), base_model=cfg.model_name_or_path,
                        datasets=fingerprints, metrics=metrics, started=started,
                        launch=launch_info(trainer.accelerator))
    process_state().wait_for_everyone()
    return str(out)
