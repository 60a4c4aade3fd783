"""The one table of other tools' config key names: LLaMA-Factory's YAML, TRL's configs and transformers'
TrainingArguments keys that mean an rlhf key (an alias, with its value mapping), keys with nothing to do here
(ignored, with a log line) and keys rlhf does not honour (refused: one line saying what to do).

rlhf/config.py (``resolve_aliases``) applies it before any check, so a LLaMA-Factory YAML of the common keys runs
with ``rlhf <stage>`` for its ``stage:``. Our own keys are not listed here (output_dir, learning_rate,
per_device_train_batch_size, lora_alpha, ... already have the same names); the README's table lists both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

LF, TRL, HF, AX = "LLaMA-Factory", "TRL", "transformers", "axolotl"

SKIP = object()  # a value that sets nothing (load_in_4bit: false, flash_attn: auto, do_train: true)


@dataclass(frozen=True)
class Alias:
    key: str | None  # the rlhf key it sets (itself: a value alias of our own key); None: ignored or refused
    source: str  # whose name it is: LF, TRL, HF (several: "TRL, transformers")
    value: dict | Callable[[Any], Any] | None = None  # their value -> ours (dict: only these values); None: as is
    note: str = ""  # ignored: why (logged); refused: what to do (the error)
    refused: bool = False


def _bool_to(true, false=SKIP):
    def f(v):
        if not isinstance(v, bool):
            raise ValueError("use true or false")
        return true if v else false
    return f


def _only(ok, why: str):
    """A key that is fine at the value ``ok`` (and sets nothing), else refused with ``why``."""
    def f(v):
        if v != ok and str(v).lower() != str(ok).lower():
            raise ValueError(why)
        return SKIP
    return f


def _lora_target(v):
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v if isinstance(v, list) else [v])
    return ["all-linear" if s == "all" else s for s in items]


# LLaMA-Factory template names (src/llamafactory/data/template.py) -> ours, first one rlhf/templates.py has;
# a model-specific name rlhf lacks becomes `auto` (the tokenizer's own template, which ships with such models).
LF_TEMPLATES = {
    "alpaca": ["alpaca"], "chatml": ["chatml"], "llama3": ["llama3"],
    "llama2": ["llama2", "llama-2"], "mistral": ["mistral"], "qwen": ["qwen2.5", "qwen", "chatml"],
    "gemma": ["gemma"], "phi": ["phi3", "phi-3"],
    **{n: [] for n in ("default", "empty", "llama4", "qwen3", "qwen2_vl", "gemma3", "phi4", "deepseek",
                       "deepseek3", "yi", "vicuna", "zephyr", "glm4", "chatglm3", "baichuan2", "intern2", "cohere",
                       "falcon", "olmo", "openchat", "solar", "starchat")},
}


def _template(name):
    """Ours as is; a LLaMA-Factory name -> ours, else auto; anything else as is (the choices check names it)."""
    from rlhf.templates import TEMPLATES

    if name in TEMPLATES or name in ("auto", "own") or name not in LF_TEMPLATES:
        return name
    return next((t for t in LF_TEMPLATES[name] if t in TEMPLATES), "auto")


def _resume(v):
    if isinstance(v, bool):
        return v
    raise ValueError("rlhf resumes from output_dir's last checkpoint: give resume: true instead")


_IGNORED = {
    "plot_loss": "rlhf always writes training_curves.png",
    "overwrite_cache": "rlhf keeps no tokenized-data cache",
    "preprocessing_num_workers": "rlhf tokenizes in the training process",
    "dataloader_num_workers": "rlhf loads batches in the training process",
    "ddp_timeout": "rlhf sets the process group's timeout itself",
    "save_only_model": "rlhf checkpoints always hold the optimizer state, for an exact resume",
    "logging_dir": "rlhf logs to output_dir (train_log.jsonl)",
    "eval_strategy": "rlhf evaluates every eval_steps, else once per epoch when there is eval data",
    "evaluation_strategy": "rlhf evaluates every eval_steps, else once per epoch when there is eval data",
    "save_strategy": "rlhf saves every save_steps",
}

_REFUSED = {
    "deepspeed": "rlhf runs DeepSpeed through accelerate (one launch for all stages): `accelerate launch --config_file "
                 "configs/accelerate/deepspeed_zero2.yaml -m rlhf <stage> FILE` (put your ZeRO JSON in that file's "
                 "deepspeed_config_file); drop the key",
    "ref_model": "rlhf's KL reference is the SFT adapter (adapter_name_or_path / sft_dir); drop the key",
    "do_predict": "generate with `rlhf generate FOLDER` or score with `rlhf eval FOLDER` after training; drop the key",
    "push_to_hub": "rlhf writes a local folder; upload it yourself (`rlhf export` merges the adapter)",
    "export_dir": "merge the adapter with `rlhf export FOLDER OUT`; drop the key",
    "ppo_whiten_rewards": "rlhf whitens advantages instead (whiten_advantages); drop the key",
    "whiten_rewards": "rlhf whitens advantages instead (whiten_advantages); drop the key",
    "ppo_buffer_size": "rlhf's PPO takes batch_size prompts per step and mini_batch_size per update; drop the key",
}
for _k in ("use_unsloth", "enable_liger_kernel", "use_dora", "use_rslora", "pissa_init", "loraplus_lr_ratio",
           "neftune_noise_alpha", "rope_scaling", "new_special_tokens", "resize_vocab", "mask_history", "use_galore",
           "use_badam", "use_apollo", "shift_attn", "upcast_layernorm", "additional_target", "mix_strategy",
           "interleave_probs", "streaming", "tokenized_path", "pref_beta", "pref_loss"):
    _REFUSED[_k] = "rlhf has no such option; drop the key (README: keys of other tools)"

ALIASES: dict[str, Alias] = {
    # the model and its quantization
    "load_in_4bit": Alias("quantization", f"{TRL}, {HF}", _bool_to("4bit")),
    "load_in_8bit": Alias("quantization", f"{TRL}, {HF}", _bool_to("8bit")),
    "quantization_bit": Alias("quantization", LF, {4: "4bit", 8: "8bit", None: "none"}),
    "quantization_type": Alias("bnb_4bit_quant_type", LF, {"nf4": "nf4", "fp4": "fp4"}),
    "double_quantization": Alias("bnb_4bit_use_double_quant", LF),
    "use_bnb_nested_quant": Alias("bnb_4bit_use_double_quant", TRL),
    "torch_dtype": Alias("dtype", f"{TRL}, {HF}"),
    "flash_attn": Alias("attn_implementation", LF, {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager",
                                                    "auto": SKIP},
                        note="auto: transformers' default kernel"),
    "quantization_method": Alias(None, LF, _only("bnb", "rlhf quantizes with bitsandbytes only (bnb); drop the "
                                                       "key, or quantize with quantization: 4bit|8bit")),
    "adapter_name_or_path": Alias("sft_dir", LF),
    "reward_model": Alias("rm_dir", LF),
    "reward_model_type": Alias(None, LF, _only("lora", "rlhf's reward model is a LoRA RM folder (reward_model / "
                                                       "rm_dir); drop the key")),
    # LoRA and the method
    "lora_rank": Alias("lora_r", LF),
    "lora_target": Alias("lora_target", LF, _lora_target),  # LLaMA-Factory's `all` is our all-linear
    "lora_target_modules": Alias("lora_target", TRL, _lora_target),
    "use_peft": Alias("finetuning_type", TRL, _bool_to("lora", "full")),
    "disable_gradient_checkpointing": Alias("gradient_checkpointing", LF, lambda v: not v),
    "stage": Alias(None, LF, note="checked against the command"),
    "do_train": Alias(None, f"{LF}, {HF}", _only(True, "rlhf stages always train; for eval only use `rlhf eval "
                                                        "FOLDER`")),
    # data
    "cutoff_len": Alias("max_length", LF),
    "max_seq_length": Alias("max_length", TRL),
    "max_samples": Alias("num_samples", LF),
    "dataset_name": Alias("dataset", TRL),
    "dataset_dir": Alias("registry_file", LF, lambda v: f"{str(v).rstrip('/')}/dataset_info.json"),
    "template": Alias("template", LF, _template, note="LLaMA-Factory's name; auto: the tokenizer's own template"),
    "assistant_only_loss": Alias("train_on_prompt", TRL, lambda v: not v),
    # training
    "resume_from_checkpoint": Alias("resume", HF, _resume),
    "num_ppo_epochs": Alias("ppo_epochs", TRL),
    "response_length": Alias("max_new_tokens", TRL),
    "ppo_target": Alias("kl_target", LF),
    "init_kl_coef": Alias("kl_coef", TRL),
    "adap_kl_ctrl": Alias("adaptive_kl", TRL),
    "ppo_score_norm": Alias("score_norm", LF, _bool_to("normalize", "none")),
    **{k: Alias(None, LF if k not in ("logging_dir", "eval_strategy", "evaluation_strategy", "save_strategy",
                                      "save_only_model", "dataloader_num_workers") else HF, note=why)
       for k, why in _IGNORED.items()},
    **{k: Alias(None, LF, note=why, refused=True) for k, why in _REFUSED.items()},
}
# axolotl's YAML (load_in_4bit/8bit, lora_r/alpha/dropout, lora_target_modules, learning_rate, warmup_steps,
# gradient_accumulation_steps, output_dir, seed, bf16/fp16 as true/false have the same meaning already)
AX_TEMPLATES = {"chatml": "chatml", "llama3": "llama3", "llama2": "llama2", "mistral_v1": "mistral",
                "mistral": "mistral", "gemma": "gemma", "phi_3": "phi3", "qwen_25": "qwen2.5", "alpaca": "alpaca",
                "tokenizer_default": "auto"}
ALIASES.update({
    "base_model": Alias("model_name_or_path", AX),
    "sequence_len": Alias("max_length", AX),
    "micro_batch_size": Alias("per_device_train_batch_size", AX),
    "num_epochs": Alias("num_train_epochs", AX),
    "val_set_size": Alias("val_size", AX),
    "optimizer": Alias("optim", AX),
    "lr_scheduler": Alias("lr_scheduler_type", AX),
    "adapter": Alias("finetuning_type", AX, {"lora": "lora", "qlora": "lora"},
                     note="qlora also needs load_in_4bit: true, as in axolotl"),
    "lora_target_linear": Alias("lora_target", AX, _bool_to(["all-linear"])),
    "chat_template": Alias("template", AX, lambda v: AX_TEMPLATES.get(v, v)),
    "flash_attention": Alias("attn_implementation", AX, _bool_to("flash_attention_2")),
    "rl": Alias(None, AX, note="rlhf's stages are commands: `rlhf dpo` (loss_type: sigmoid, ipo, simpo, orpo, ...), "
                               "`rlhf grpo`, `rlhf ppo`; drop the key and run the command", refused=True),
    "datasets": Alias(None, AX, note="give `dataset:` registry names or files (a preference or conversation file's "
                                      "columns go in a registry_file entry; README: Datasets)", refused=True),
    "wandb_project": Alias(None, AX, note="use report_to: wandb (the project comes from WANDB_PROJECT)", refused=True),
})
ALIASES["do_eval"] = Alias(None, HF, _only(False, "rlhf evaluates during training when there is eval data (val_size "
                                                  "or eval_dataset); for eval only use `rlhf eval FOLDER`"))
ALIASES["deepspeed"] = Alias(None, HF, note=_REFUSED["deepspeed"], refused=True)
