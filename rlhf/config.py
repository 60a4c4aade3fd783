"""Typed stage configs: YAML file + command-line overrides -> one dataclass.

Every field is documented once, in its ``metadata["help"]``; the CLI help is built
from it. Unknown keys and values of the wrong type are errors that name the key,
where it came from, and the nearest valid key.
"""
from __future__ import annotations

from rlhf.errors import RlhfError, did_you_mean
from rlhf.templates import TEMPLATES

import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("rlhf")


class ConfigError(RlhfError, ValueError):
    """A bad config file or override; the message says what, where and what to do."""


# LoRA targets when lora_target is ["auto"] (the attention projections, as in the QLoRA paper's baselines):
# the loader's (rlhf/loader.py) and `rlhf estimate`'s one table.
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
}


def opt(default, help: str, **kw):
    """A config field with its one piece of documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """How the one loader builds the model (rlhf/loader.py)."""

    model_name_or_path: str = opt("", "Base model: a local folder or a hub id. RM/PPO take it from the parent stage "
                                      "when empty.")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the model folder/hub.")
    dtype: str = opt("auto", "Weights dtype: auto (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), "
                             "float32, bfloat16, float16.", choices=["auto", "float32", "bfloat16", "float16"])
    attn_implementation: str | None = opt(None, "Attention kernel: eager, sdpa, flash_attention_2 (None: transformers' "
                                                "default).")
    quantization: str = opt("auto", "Quantize the frozen base with bitsandbytes: 4bit (QLoRA), 8bit, none, or auto "
                                    "(rm/ppo: as the parent SFT folder was trained, with its 4-bit settings; sft/pt: "
                                    "none).", choices=["auto", "none", "4bit", "8bit"])
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 or fp4.", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = opt(True,
                                          "Quantize the 4-bit quantization constants too (QLoRA double quantization).")
    bnb_4bit_compute_dtype: str = opt("auto", "dtype of 4-bit matmuls: auto (same as dtype), float32, bfloat16, "
                                              "float16.", choices=["auto", "float32", "bfloat16", "float16"])
    finetuning_type: str = opt("lora", "lora (adapters on a frozen, possibly quantized base), full (every weight), or "
                                       "freeze (only the last freeze_trainable_layers blocks).",
                                       choices=["lora", "full", "freeze"])
    freeze_trainable_layers: int = opt(2, "With finetuning_type=freeze: how many of the last transformer blocks train.")
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_target: list[str] = opt(["auto"], "Modules that get LoRA: auto (per-architecture default), all-linear, or "
                                           "names such as q_proj,v_proj.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    gradient_checkpointing_reentrant: bool = opt(False, "With gradient_checkpointing: torch's reentrant implementation "
                                                        "(use_reentrant=True) instead of the non-reentrant default.")
    attention_softmax_fp32: bool = opt(False, "Stability (full-parameter training): attention scores and softmax in "
                                              "fp32 (GLM-130B). Costs memory and speed.")
    embedding_gradient_scale: float = opt(1.0, "Stability (full-parameter training): scale the embedding layer's "
                                               "gradient, emb*a + emb.detach()*(1-a) (GLM-130B: 0.1); 1.0 is off.")


def stage_model_config(manifest_config: dict, *, trust_remote_code: bool = False, **overrides) -> ModelConfig:
    """The ModelConfig a finished stage folder was trained with (its manifest's config), with ``overrides``.

    ``trust_remote_code`` is never read from the folder: anyone can write a manifest, so only the user's own
    option (--trust-remote-code) may run a model's custom Python."""
    keys = {k: v for k, v in manifest_config.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**keys, **overrides, "trust_remote_code": trust_remote_code})


QUANT_KEYS = ("quantization", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def inherit_quantization(cfg, parent: dict | None, folder: str | None = None) -> None:
    """``quantization: auto`` becomes the parent stage's quantization and 4-bit settings (an RM or PPO run on the
    base its SFT adapter was trained on), or none for a stage without a parent; says which in the log."""
    if cfg.quantization != "auto":
        return
    pcfg = (parent or {}).get("config") or {}
    for k in QUANT_KEYS:
        if k in pcfg:
            setattr(cfg, k, pcfg[k])
    if cfg.quantization == "auto":
        cfg.quantization = "none"
    if parent:
        log.info("quantization %s, as the parent %s was trained (quantization: auto; set it to override)",
                 cfg.quantization, folder)


@dataclass
class DataConfig:
    """Which data, and how it becomes tokens (rlhf/data.py, rlhf/templates.py)."""

    dataset: list[str] = opt([], "Registry names or file paths (jsonl/json/csv/parquet); several mix. `rlhf datasets "
                                 "list` shows the names.")
    eval_dataset: list[str] = opt([], "Held-out datasets; empty: split val_size off the training data.")
    registry_file: str | None = opt(None, "Your own registry file (YAML/JSON, or LLaMA-Factory's dataset_info.json), "
                                          "merged over the built-in one.")
    template: str = opt("auto", "Chat template: auto (the tokenizer's own, else chatml), own (the tokenizer's), or a "
                                f"built-in name: {', '.join(TEMPLATES)}.", choices=["auto", "own", *TEMPLATES])
    max_length: int = opt(1024, "Longest tokenized example; longer ones are truncated.")
    num_samples: int | None = opt(None, "Use at most this many rows of each dataset.")
    val_size: float = opt(0.0,
                          "Share (0-1) or count (>=1) of training rows held out for eval when eval_dataset is empty.")
    skip_invalid_rows: bool = opt(False, "Skip rows that fail validation (and report how many) instead of stopping at "
                                         "the first.")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every stage."""

    output_dir: str = opt("", "Stage output folder (written atomically: a finished folder has a manifest.json).")
    seed: int = opt(42, "Random seed for data order, initialisation and sampling.")
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    num_train_epochs: float = opt(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_train_batch_size: int = opt(4, "Training micro-batch size per device.")
    per_device_eval_batch_size: int = opt(8, "Eval batch size per device.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: str = opt("cosine",
                                 "Learning-rate schedule: linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = opt(0.0, "Share of steps for linear warm-up.")
    warmup_steps: int = opt(0, "Optimizer steps of linear warm-up; when > 0 it is used instead of warmup_ratio.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value.")
    optim: str = opt("adamw_torch",
                     "Optimizer, any name transformers' `optim` takes (every stage, ppo too): adamw_torch, "
                     "adamw_torch_fused, adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, lion_8bit, adafactor...")
    bf16: bool = opt(False, "bf16 mixed precision.")
    fp16: bool = opt(False, "fp16 mixed precision.")
    logging_steps: int = opt(10, "Log every N optimizer steps.")
    report_to: list[str] = opt(["none"], "Experiment trackers that get every logged row (the train_log.jsonl "
                               "names): none, tensorboard, wandb, mlflow, comet_ml, ... (any name transformers' "
                               "report_to takes; all: every one installed). tensorboard writes under "
                               "<output_dir>/runs/.")
    eval_steps: int | None = opt(None, "Evaluate every N steps (None: once per epoch when there is eval data).")
    save_steps: int = opt(500, "Write a checkpoint (weights, optimizer and scheduler state) every N steps; 500 as in "
                               "transformers and LLaMA-Factory (a shorter run saves none; docs/sft.md).")
    save_total_limit: int | None = opt(2, "Keep only the last N checkpoints.")
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir's working folder.")
    overwrite_output_dir: bool = opt(False, "Replace an existing finished output_dir.")


# ---------------------------------------------------------------------------
# Loading: YAML + overrides -> dataclass


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_of(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, key: str, where: str):
    """Turn a YAML value or a command-line string into ``tp``, or raise ConfigError."""

    def bad(why=""):
        raise ConfigError(f"{where}: key '{key}' expects {_describe(tp)}, got {value!r}{why}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, where)
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        bad(" (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            bad()
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            bad()
        if f != int(f):
            bad()
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            bad()
    if tp is str:
        if isinstance(value, (dict, list)):
            bad()
        return str(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                bad(" (give JSON)")
        if not isinstance(value, dict):
            bad()
        return value
    return value


def nearest(key: str, valid) -> str:
    """The hint after an unknown key: the nearest valid key or alias (rlhf/aliases.py) that applies, if one is close
    (a cutoff of 0.6: `load_in_4bit` is not 'logging_steps'), else all the valid keys."""
    from rlhf.aliases import ALIASES

    names = [*valid, *(k for k, a in ALIASES.items() if a.key in valid and not a.refused)]
    return did_you_mean(key, names, cutoff=0.6, otherwise=f"; valid keys: {', '.join(sorted(valid))}")


def _show(v) -> str:
    return "true" if v is True else "false" if v is False else "null" if v is None else \
        ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _stage_of(cls) -> str:
    return cls.__name__.removesuffix("Config").lower()  # SFTConfig -> sft, the command's name (stages/__init__.py)


def resolve_aliases(cls, values: dict, where: dict[str, str]) -> tuple[dict, dict]:
    """Other tools' key names (the one table, rlhf/aliases.py) -> ours, each said in one log line; an ignored key is
    logged and dropped, a refused one (or an alias whose value has no counterpart) is a ConfigError, and so is an
    alias given beside its rlhf key (or another alias of it) with another value. ``stage:`` (LLaMA-Factory's) must
    name the command that reads the file. Keys of neither kind pass through to ``build``'s checks."""
    from rlhf.aliases import ALIASES, SKIP

    valid, stage = fields_of(cls), _stage_of(cls)
    out, out_where, came = {}, {}, {}  # came: our key -> the key (ours or an alias) that set it
    own = {k.replace("-", "_"): k for k in values}
    for key, value in values.items():
        name, src = key.replace("-", "_"), where.get(key, "config")
        alias = ALIASES.get(name)
        if alias is None or (alias.key == name and name not in valid):
            target, v = name, value
        else:
            if name == "stage":
                if str(value) not in ("pt", "sft", "rm", "ppo", "dpo", "grpo"):
                    raise ConfigError(f"{src}: stage: {value} (LLaMA-Factory): rlhf has no such stage (pt, sft, rm, "
                                      "ppo, dpo, grpo)")
                if str(value) != stage:
                    raise ConfigError(f"{src}: stage: {value} (LLaMA-Factory) is not this command's (`rlhf {stage}`); "
                                      f"run `rlhf {value} {src}`, or drop the key")
                log.info("%s: stage: %s (LLaMA-Factory) -> `rlhf %s`", src, value, stage)
                continue
            if alias.refused:
                raise ConfigError(f"{src}: key '{name}' ({alias.source}) is not honoured: {alias.note}")
            try:
                v = alias.value(value) if callable(alias.value) else value
                if isinstance(alias.value, dict):  # a command-line "4" is YAML's 4
                    hit = [k for k in alias.value if _show(k).lower() == _show(value).lower()]
                    if not hit:
                        raise ValueError(f"use one of {', '.join(_show(k) for k in alias.value)}")
                    v = alias.value[hit[0]]
            except ValueError as e:
                raise ConfigError(f"{src}: key '{name}' ({alias.source}) got {value!r}: {e}") from None
            if alias.key is None or v is SKIP:
                why = f" ({alias.note})" if alias.note else ""
                log.info("%s: %s: %s (%s) ignored%s", src, name, _show(value), alias.source, why)
                continue
            target = alias.key
            if target not in valid:
                raise ConfigError(f"{src}: key '{name}' ({alias.source}) means rlhf's '{target}', which `rlhf {stage}` "
                                  "does not take; drop the key")
            if (target, v) != (name, value):
                why = f" ({alias.note})" if alias.note else ""
                log.info("%s: %s: %s -> %s: %s%s", src, name, _show(value), target, _show(v), why)
        if target in came and target in valid:
            a, b = (coerce(x, _type_of(cls, target), target, src) for x in (out[target], v))
            if a != b:
                raise ConfigError(f"{src}: '{came[target][0]}: {_show(came[target][1])}' and '{name}: {_show(value)}' "
                                  f"set '{target}' differently; give one of them")
        out[target], out_where[target], came[target] = v, src, (own.get(name, key), value)
    return out, out_where


def build(cls, values: dict, where: dict[str, str]):
    """Check keys and types of ``values`` (key -> raw value) and build ``cls``.

    ``where`` maps each key to the place it came from (a file path or "command line").
    """
    values, where = resolve_aliases(cls, values, where)
    valid = fields_of(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        src = where.get(key, "config")
        if name not in valid:
            raise ConfigError(f"{src}: unknown key '{key}'{nearest(name, valid)}")
        tp = _type_of(cls, name)
        v = coerce(value, tp, name, src)
        choices = valid[name].metadata.get("choices")
        if choices and v is not None and v not in choices:
            raise ConfigError(f"{src}: key '{name}' must be one of {choices}, got {v!r}{did_you_mean(str(v), choices)}")
        if name == "lora_target" and len(v) > 1 and {"auto", "all-linear"} & set(v):
            raise ConfigError(f"{src}: key 'lora_target': 'auto' and 'all-linear' stand alone, got {','.join(v)}; "
                              "give one of them, or module names such as q_proj,v_proj")
        kwargs[name] = v
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p}{where}: not valid YAML ({what}); fix the file there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(args: list[str]) -> dict:
    """``--key value``, ``--key=value`` or ``key=value`` (dashes or underscores) -> {key: "value"}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" in a:
                k, v = a.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                k, v = a, args[i + 1]
                i += 1
            else:
                k, v = a, "true"  # a bare flag
        elif "=" in a:
            k, v = a.split("=", 1)
        else:
            raise ConfigError(f"command line: cannot read '{a}'; give overrides as --key value or key=value")
        out[k.replace("-", "_")] = v
        i += 1
    return out


def load_config(cls, path: str | None = None, overrides: dict | None = None):
    """YAML file (optional) then overrides, checked and typed into ``cls``."""
    values, where = {}, {}
    # other tools' names resolved per source, so a command-line key overrides the file's alias of it
    layers = [(read_yaml(path), str(path))] if path else []
    for layer, src in [*layers, (overrides or {}, "command line")]:
        vals, wh = resolve_aliases(cls, layer, {k: src for k in layer})
        values.update(vals)
        where.update(wh)
    return build(cls, values, where)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
