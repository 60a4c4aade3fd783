"""`rlhf rm`: a reward model (scalar score head) trained with trl's RewardTrainer.

Recipe (InstructGPT): start from the SFT model -- its LoRA adapter keeps training and the score
head is added as a saved module (LoRA ``modules_to_save=["score"]``) -- and fit the Bradley-Terry
loss -log sigmoid(r_chosen - r_rejected) on preference pairs rendered with the SFT chat template.
The folder loads with plain transformers + peft:

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)
    rm = PeftModel.from_pretrained(base, "runs/demo/rm")   # rm(**tokenizer(text)).logits[:, 0] is the score
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, opt
from rlhf.data import DataError

log = logging.getLogger("rlhf")


@dataclass
class RMConfig(ModelConfig, DataConfig, TrainConfig):
    sft_dir: str = opt("", "The SFT stage folder to start from (its adapter, tokenizer and chat template).")
    from_base: bool = opt(False, "Start from the bare base model (model_name_or_path) instead of the SFT folder.")
    center_rewards_coefficient: float | None = opt(None, "Add coef * mean((r_chosen + r_rejected)^2) to keep scores "
                                                         "centred (Eisenstein et al. 2023); e.g. 0.01.")

    def validate(self):
        if not self.dataset:
            raise ConfigError("rm: no dataset given; set `dataset:` to a preference dataset (chosen/rejected)")
        if not self.from_base and not self.sft_dir:
            raise ConfigError("rm: set sft_dir (the `rlhf sft` output), or from_base: true with model_name_or_path")
        if self.from_base and not self.model_name_or_path:
            raise ConfigError("rm: from_base needs model_name_or_path (the base model to put the score head on)")


def tokenize_pairs(examples: list[dict], tokenizer, max_length: int, where: str):
    """Preference examples -> chosen_ids/rejected_ids; counts truncations and pairs made identical by it."""
    from datasets import Dataset

    from rlhf.templates import encode_pair

    rows, truncated, same = [], 0, 0
    for e in examples:
        chosen, t1 = encode_pair(tokenizer, e["messages"], e["chosen"], max_length)
        rejected, t2 = encode_pair(tokenizer, e["messages"], e["rejected"], max_length)
        truncated += t1 and t2
        if chosen == rejected:
            same += 1
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
    if truncated:
        log.warning("rm %s: %d pairs were longer than max_length=%d on both sides and were truncated", where, truncated,
                    max_length)
    if same:
        log.warning("rm %s: %d pairs became identical after truncation to max_length=%d and were skipped", where, same,
                    max_length)
    if not rows:
        raise DataError(f"rm {where}: no usable preference pair (all identical after truncation to "
                        f"max_length={max_length}); raise max_length")
    return Dataset.from_list(rows), {"truncated": truncated, "identical_after_truncation": same}


def resolve_parent(cfg: RMConfig) -> tuple[str, list, str | None]:
    """Base model, adapters to load, and the folder holding the tokenizer/template to use."""
    from rlhf.loader import AdapterSpec, inherit_quantization
    from rlhf.manifest import check_parent

    if cfg.from_base:
        inherit_quantization(cfg, None)
        return cfg.model_name_or_path, [AdapterSpec("default", trainable=True)], None
    # model_name_or_path, when set, is the SFT's base in another place (a moved folder): the fingerprint must match
    m = check_parent(cfg.sft_dir, "sft", for_stage="rlhf rm", base_model=cfg.model_name_or_path or None,
                     base_option="model_name_or_path (--model-name-or-path)")
    inherit_quantization(cfg, m, cfg.sft_dir)
    base = cfg.model_name_or_path or m["base_model"]["path"]
    if m["config"].get("finetuning_type", "lora") != "lora":  # full/freeze SFT saved whole weights: build on them
        return cfg.sft_dir, [AdapterSpec("default", trainable=True)], cfg.sft_dir
    for k in ("lora_r", "lora_alpha", "lora_target"):  # the SFT adapter's shape is the one trained (resolved config)
        setattr(cfg, k, m["config"].get(k, getattr(cfg, k)))
    return base, [AdapterSpec("default", folder=cfg.sft_dir, trainable=True, modules_to_save=["score"])], cfg.sft_dir


def by_pair(reward_trainer):
    """trl's RewardTrainer with eval accuracy and margin over all held-out pairs. trl averages per-batch means, so a
    short last batch weighs as much as a full one: the demo's 200 pairs in batches of 64 read 0.832 for a true
    share of 0.89."""
    import torch

    class RewardTrainerByPair(reward_trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if not self.model.training:
                chosen, rejected = torch.chunk(outputs.logits.detach().squeeze(-1).float(), chunks=2)
                diff = self.accelerator.gather_for_metrics(chosen - rejected)  # every process's pairs, once each
                self._pair_diffs = getattr(self, "_pair_diffs", []) + [diff]
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if not self.model.training and getattr(self, "_pair_diffs", None):
                diffs, self._pair_diffs = torch.cat(self._pair_diffs), []
                self._metrics["eval"]["accuracy"] = [(diffs > 0).float().mean().item()]
                self._metrics["eval"]["margin"] = [diffs.mean().item()]
            super().log(logs, start_time)

    return RewardTrainerByPair


def run(cfg: RMConfig) -> str:
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from rlhf.config import to_dict
    from rlhf.dist import launch_info, process_state
    from rlhf.loader import check_lora_targets, load_model, load_tokenizer, trainable_dtypes_kept
    from rlhf.manifest import finish_output, prepare_output
    from rlhf.templates import apply_template
    from rlhf.train_utils import (load_train_eval, log_callback, loss_summary, plot_curves, read_log, resume_point,
                                  train_from, trainer_kwargs)

    started, requested, main = time.time(), to_dict(cfg), process_state().is_main_process
    set_seed(cfg.seed)
    base, adapters, tok_dir = resolve_parent(cfg)
    cfg.model_name_or_path = base

    # --- data, rendered with the SFT folder's chat template (checked before the working folder is made)
    tokenizer = load_tokenizer(tok_dir or base, cfg.trust_remote_code)
    cfg.template = apply_template(tokenizer, "auto" if tok_dir else cfg.template)
    train, evals, fingerprints = load_train_eval(cfg, kind="preference")
    train_ds, train_counts = tokenize_pairs(train, tokenizer, cfg.max_length, "train")
    eval_ds = tokenize_pairs(evals, tokenizer, cfg.max_length, "eval")[0] if evals else None
    log.info("rm: %d training and %d eval pairs", len(train_ds), len(eval_ds) if eval_ds else 0)
    if cfg.finetuning_type == "lora" and any(a.folder is None for a in adapters):  # from_base: a new LoRA
        check_lora_targets(cfg)
    work = prepare_output(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, requested=requested)

    # --- model: score head on the base, SFT adapter continued, head saved with the adapter. The trainer's
    # arguments first: under a DeepSpeed ZeRO-3 launch they make the loader shard the weights while they load.
    args = RewardConfig(**trainer_kwargs(cfg, work, has_eval=eval_ds is not None), max_length=None,
                        center_rewards_coefficient=cfg.center_rewards_coefficient, disable_dropout=True)
    model = load_model(cfg, head="score", adapters=adapters if cfg.finetuning_type == "lora" else [], for_training=True)

    # --- train
    with trainable_dtypes_kept(model):  # a quantized base: trl would cast the score head to bf16
        trainer = by_pair(RewardTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                         processing_class=tokenizer, callbacks=[log_callback(work)])
    train_from(trainer, resume_point(work, cfg.resume))
    metrics = {}
    if eval_ds is not None:
        res = trainer.evaluate()
        metrics.update(eval_accuracy=res.get("eval_accuracy"), eval_margin=res.get("eval_margin"))

    # --- save (the main process writes; the others wait for the folder to be finished)
    trainer.save_model(str(work))
    if not main:
        process_state().wait_for_everyone()
        return cfg.output_dir
    rows = read_log(work)
    metrics.update(loss_summary(rows), **train_counts)
    tokenizer.save_pretrained(str(work))
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    plot_curves(rows, ["loss", "eval_loss", "eval_accuracy", "eval_margin"], work / "training_curves.png",
                "reward model")
    log.info("rm metrics: %s", metrics)
    out = finish_output(work, cfg.output_dir, stage="rm", config=to_dict(cfg), base_model=base,
                        parent=None if cfg.from_base else cfg.sft_dir, datasets=fingerprints, metrics=metrics,
                        started=started, launch=launch_info(trainer.accelerator))
    process_state().wait_for_everyone()
    return str(out)
