"""`rlhf dpo`: direct preference optimisation (and its family) from an SFT folder, with trl's trainers.

Recipe (Rafailov et al. 2023): the policy is the SFT adapter, trained further on preference pairs rendered with
the SFT chat template; the reference is the same SFT adapter, frozen, on the same base. trl's DPOTrainer does
that when it is given a PeftModel whose "default" adapter is the SFT one: it adds a frozen copy named "ref" and
switches to it for the reference log-probs (no second model, not the bare base). loss_type:

- sigmoid (DPO), ipo (Azar et al. 2023), hinge, robust, sigmoid_norm, ... : any of trl's DPOTrainer loss types,
  the reference being the frozen SFT adapter;
- simpo (Meng et al. 2024: length-normalised log-prob margin with a target margin, no reference) through trl's
  CPOTrainer (loss_type simpo, cpo_alpha 0), and orpo (Hong et al. 2024: SFT loss + odds-ratio term, no
  reference) through trl's ORPOTrainer; both trl.experimental, and no "ref" adapter is made.

KTO is left out: it learns from unpaired good/bad labels, a format the registry does not read.

Output folder (the stage contract; a policy like sft's): the trained adapter at the root
(``PeftModel.from_pretrained(base, folder)``), tokenizer, manifest, ``train_log.jsonl`` (trl's rewards/accuracies and
rewards/margins: the implicit reward beta * log(pi / pi_ref) of chosen over rejected), ``training_curves.png``,
``checkpoints/``. The held-out task metrics (greedy answers to the eval pairs' prompts) before and after are in the
manifest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, opt

log = logging.getLogger("rlhf")

REFERENCE_FREE = ("simpo", "orpo")  # trl's CPOTrainer (simpo) and ORPOTrainer
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "discopop")  # trl 1.16's DPOTrainer loss types that take pairs as they are


@dataclass
class DPOConfig(ModelConfig, DataConfig, TrainConfig):
    sft_dir: str = opt("", "The SFT stage folder: the policy starts from its adapter, the reference is that adapter "
                           "frozen on the same base (tokenizer and chat template from it too).")
    loss_type: str = opt("sigmoid", "sigmoid (DPO), ipo, hinge, robust, sigmoid_norm, ... (trl's DPOTrainer), or the "
                                    "reference-free simpo (trl's CPOTrainer) and orpo (ORPOTrainer).",
                         choices=[*DPO_LOSSES, *REFERENCE_FREE])
    beta: float = opt(0.1, "DPO's beta (deviation from the reference; IPO's tau; SimPO's beta; ORPO's lambda).")
    label_smoothing: float = opt(0.0, "Label smoothing (robust DPO: the share of flipped labels, < 0.5).")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin.")
    sft_weight: float = opt(0.0, "Add this weight x the chosen replies' NLL to a DPOTrainer loss (RPO, Pang et al. "
                                 "2024: keeps the chosen answers likely, so DPO does not trade correctness for the "
                                 "preferred layout); 0: off.")
    eval_samples: int = opt(64, "Held-out prompts (of the eval pairs) answered greedily for the task metrics before "
                                "and after training (0: off).")
    max_new_tokens: int = opt(64, "Longest answer in that evaluation.")
    # TrainConfig fields with a DPO meaning
    learning_rate: float = opt(5e-6, "Peak learning rate (DPO moves far from the reference quickly).")
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule.")

    def validate(self):
        if not self.dataset:
            raise ConfigError("dpo: no dataset given; set `dataset:` to a preference dataset (chosen/rejected)")
        if not self.sft_dir:
            raise ConfigError("dpo: set sft_dir (the `rlhf sft` output): the policy and the reference start from it")
        if self.beta <= 0:
            raise ConfigError(f"dpo: key 'beta' must be > 0 (got {self.beta})")
        if self.sft_weight and self.loss_type in REFERENCE_FREE:
            raise ConfigError(f"dpo: key 'sft_weight' adds to DPOTrainer's losses; {self.loss_type} has its own (ORPO: "
                              "its SFT term is built in; SimPO: set loss_type sigmoid to combine)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo: key 'label_smoothing' must be in [0, 0.5) (got {self.label_smoothing})")


def pairs_dataset(examples: list[dict]):
    """Preference examples -> trl's conversational prompt / chosen / rejected rows (the chat template of the
    tokenizer renders them, as sft and rm render theirs)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": e["messages"], "chosen": [{"role": "assistant", "content": e["chosen"]}],
                               "rejected": [{"role": "assistant", "content": e["rejected"]}]} for e in examples])


def trainer_for(cfg: DPOConfig, kwargs: dict):
    """(trainer class, its config) for cfg.loss_type."""
    common = dict(kwargs, beta=cfg.beta, max_length=cfg.max_length, disable_dropout=True)
    if cfg.loss_type == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma,
                                     label_smoothing=cfg.label_smoothing)
    if cfg.loss_type == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**common)
    from trl import DPOConfig as TrlDPOConfig, DPOTrainer

    losses, weights = [cfg.loss_type], [1.0]
    if cfg.sft_weight:
        losses, weights = [cfg.loss_type, "sft"], [1.0, cfg.sft_weight]
    return DPOTrainer, TrlDPOConfig(**common, loss_type=losses, loss_weights=weights,
                                    label_smoothing=cfg.label_smoothing)


# the panels of training_curves.png (those in the log)
PLOT_KEYS = ["loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "rewards/margins",
             "eval_rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
             "grad_norm", "learning_rate"]


def run(cfg: DPOConfig) -> str:
    from transformers import set_seed

    from rlhf import evaluate
    from rlhf.config import to_dict
    from rlhf.dist import launch_info, process_state
    from rlhf.loader import AdapterSpec, inherit_quantization, load_model, load_tokenizer, trainable_dtypes_kept
    from rlhf.manifest import check_parent, finish_output, prepare_output
    from rlhf.roles import save_adapter
    from rlhf.templates import apply_template
    from rlhf.train_utils import (dataset_metric, load_train_eval, log_callback, loss_summary, metrics_before,
                                  plot_curves, read_log, resume_point, train_from, trainer_kwargs)

    started, requested, main = time.time(), to_dict(cfg), process_state().is_main_process
    set_seed(cfg.seed)
    # --- parent: the SFT folder (a LoRA adapter) on its base
    m = check_parent(cfg.sft_dir, "sft", for_stage="rlhf dpo", base_model=cfg.model_name_or_path or None,
                     base_option="model_name_or_path (--model-name-or-path)")
    if m["config"].get("finetuning_type", "lora") != "lora" or cfg.finetuning_type != "lora":
        raise ConfigError(f"rlhf dpo keeps the reference as the frozen SFT adapter on the same base, but {cfg.sft_dir} "
                          f"was trained with finetuning_type={m['config'].get('finetuning_type')}; train SFT with "
                          "finetuning_type: lora")
    inherit_quantization(cfg, m, cfg.sft_dir)
    cfg.model_name_or_path = cfg.model_name_or_path or m["base_model"]["path"]
    for k in ("lora_r", "lora_alpha", "lora_target"):  # the SFT adapter's shape is the one trained
        setattr(cfg, k, m["config"].get(k, getattr(cfg, k)))

    # --- data, rendered with the SFT folder's chat template (checked before the working folder is made)
    tokenizer = load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    cfg.template = apply_template(tokenizer, "auto")
    train, evals, fingerprints = load_train_eval(cfg, kind="preference")
    train_ds, eval_ds = pairs_dataset(train), pairs_dataset(evals) if evals else None
    log.info("dpo: %d training and %d eval pairs, loss %s, beta %s", len(train), len(evals), cfg.loss_type, cfg.beta)
    work = prepare_output(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, requested=requested)

    # --- model: the SFT adapter as "default" (trained); DPOTrainer adds its frozen copy "ref" on the same base
    trainer_cls, args = trainer_for(cfg, trainer_kwargs(cfg, work, has_eval=eval_ds is not None))
    model = load_model(cfg, head="lm", adapters=[AdapterSpec("default", cfg.sft_dir, trainable=True)],
                       for_training=True)
    metric = dataset_metric(cfg.eval_dataset or cfg.dataset, cfg.registry_file) if evals else None
    task_rows = evals[: cfg.eval_samples]

    def task_score(when: str) -> dict:  # greedy answers to held-out prompts, by the main process
        return evaluate.task_metrics_of(model, tokenizer, task_rows, metric, cfg, when) if main else {}

    resume_from = resume_point(work, cfg.resume)
    metrics = metrics_before(work, resume_from, lambda: task_score("before"), main)

    # --- train
    with trainable_dtypes_kept(model):  # a quantized base: trl would cast the adapter to bf16
        trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, callbacks=[log_callback(work)])
    if cfg.loss_type not in REFERENCE_FREE and "ref" not in model.peft_config:
        raise RuntimeError("trl's DPOTrainer did not add the frozen 'ref' adapter: the reference would be the bare "
                           "base")
    train_from(trainer, resume_from)
    if eval_ds is not None:
        res = trainer.evaluate()
        metrics.update({k.replace("/", "_"): v for k, v in res.items()
                        if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")})

    # --- save: the policy adapter alone at the root (not DPOTrainer's "ref" copy of the SFT adapter)
    model.set_adapter("default")
    after = task_score("after")
    if not main:
        process_state().wait_for_everyone()
        return cfg.output_dir
    save_adapter(model, "default", work)
    rows = read_log(work)
    metrics.update(loss_summary(rows), **after)
    train_rows = [r for r in rows if "rewards/accuracies" in r]
    if train_rows:
        metrics.update(reward_accuracy_last=train_rows[-1]["rewards/accuracies"],
                       reward_margin_last=train_rows[-1]["rewards/margins"])
    tokenizer.save_pretrained(str(work))
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    plot_curves(rows, PLOT_KEYS, work / "training_curves.png", f"dpo ({cfg.loss_type})")
    log.info("dpo metrics: %s", metrics)
    out = finish_output(work, cfg.output_dir, stage="dpo", config=to_dict(cfg), base_model=cfg.model_name_or_path,
                        parent=cfg.sft_dir, datasets=fingerprints, metrics=metrics, started=started,
                        launch=launch_info(trainer.accelerator))
    process_state().wait_for_everyone()
    return str(out)
