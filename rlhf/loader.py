"""The one model loader: every stage builds its model here, never with ``from_pretrained``.

``load_model(cfg, head=..., adapters=[...])`` gives a base model (local folder or hub id),
quantized with bitsandbytes when asked (QLoRA), with a causal-LM or a scalar score head,
and carrying any number of named LoRA adapters -- new ones or ones read from stage folders,
trainable or frozen -- on one copy of the base weights.
"""
from __future__ import annotations

from rlhf.config import DEFAULT_LORA_TARGETS, ConfigError
from rlhf.config import inherit_quantization  # noqa: F401 - the stages import it from the loader
from rlhf.errors import RlhfError

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("rlhf")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Names of the final norm under the base model, by architecture family.
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


class ModelPathError(RlhfError, FileNotFoundError):
    """A base model, tokenizer or adapter folder that is missing or incomplete."""


class AdapterError(ModelPathError, ValueError):
    """An adapter file that is damaged, or that does not fit this base model."""


@dataclass
class AdapterSpec:
    """One named LoRA adapter to put on the base."""

    name: str  # e.g. "default", "policy", "ref", "reward", "value"
    # stage folder with adapter_config.json + adapter_model.safetensors; None: new LoRA from cfg
    folder: str | None = None
    trainable: bool = False
    modules_to_save: list[str] | None = None  # e.g. ["score"]: also train and save the score head in this adapter


# ---------------------------------------------------------------------------
# small helpers


def resolve_dtype(name) -> torch.dtype:
    """"auto": bf16 on a CUDA GPU with bf16, fp16 on other CUDA GPUs, fp32 on CPU; else the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if key not in table:
        raise ConfigError(f"dtype '{name}' is not known; use auto, float32, bfloat16 or float16")
    return table[key]


def _looks_local(path: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ ../ ~, or with more than one slash."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def _check_base_path(path: str) -> str:
    if not path:
        raise ModelPathError("model_name_or_path is empty: give a local model folder or a hub id")
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            if (p / ADAPTER_CONFIG).is_file():
                base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
                raise ModelPathError(
                    f"model_name_or_path {path} is a LoRA adapter folder, not a base model; "
                    f"set model_name_or_path to its base ({base}) and load the adapter from the stage folder")
            raise ModelPathError(f"model folder {path} has no config.json; is it a transformers model folder?")
        return str(p)
    if _looks_local(path):
        raise ModelPathError(
            f"model_name_or_path {path} does not exist; check the path, or run the stage that writes it "
            f"first (e.g. `rlhf pt`)")
    return path  # a hub id


def _remote_code_refused(path: str) -> ModelPathError:
    """transformers' refusal to run a model's own Python code (auto_map), as one line."""
    return ModelPathError(f"{path} needs its own Python code to load (auto_map in its config.json), which runs only "
                          "with --trust-remote-code (trust_remote_code: true in a stage config): pass it if you trust "
                          "that code")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved in ``path`` (model folder, stage folder or hub id); pad token = eos when it has none."""
    from transformers import AutoTokenizer

    if not path:
        raise ModelPathError("tokenizer path is empty: give a model folder, stage folder or hub id")
    if not Path(path).expanduser().exists() and _looks_local(path):
        raise ModelPathError(f"tokenizer folder {path} does not exist; check the path, or run the stage that writes it "
                             "first")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers name no file (e.g. a torn tokenizer.json)
        if "trust_remote_code" in str(e):
            raise _remote_code_refused(path) from e
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelPathError(f"the tokenizer in {path} does not load ({why}); check the path or hub id, or, if a file "
                             "there is damaged, rerun the stage that wrote it") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelPathError(f"tokenizer in {path} has neither a pad nor an eos token; add one before training")
        tok.pad_token = tok.eos_token
    return tok


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size; shared weights once."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3: the full size of a sharded weight
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _model_type(model_or_config) -> str:
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_base_config"):  # peft / wrapped configs
        cfg = cfg.get_base_config()
    return getattr(cfg, "model_type", "") or ""


def _linear_module_names(model) -> list[str]:
    """Full names of the linear layers LoRA can target (nn.Linear, bitsandbytes layers, GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def lora_targets(model_or_config, requested) -> list[str] | str:
    """LoRA target modules: ["auto"] -> per-architecture default, ["all-linear"] -> "all-linear", else the names.

    With a model, each given name must match a linear layer (by last name or dotted suffix).
    """
    requested = [requested] if isinstance(requested, str) else list(requested or ["auto"])
    if requested == ["all-linear"]:
        return "all-linear"
    if requested == ["auto"]:
        arch = _model_type(model_or_config)
        if arch in DEFAULT_LORA_TARGETS:
            return list(DEFAULT_LORA_TARGETS[arch])
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

        if arch in peft_defaults:
            log.info("lora_target auto: no rlhf default for '%s'; using peft's %s", arch, peft_defaults[arch])
            return list(peft_defaults[arch])
        log.info("lora_target auto: no default for architecture '%s'; using all-linear", arch)
        return "all-linear"
    if "auto" in requested or "all-linear" in requested:
        raise ConfigError(f"lora_target {requested}: 'auto' and 'all-linear' must stand alone")
    if isinstance(model_or_config, torch.nn.Module):
        names = _linear_module_names(model_or_config)
        for want in requested:
            if not any(n == want or n.endswith("." + want) for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
                raise ConfigError(f"lora_target '{want}' matches no linear layer of this "
                                  f"{_model_type(model_or_config) or 'model'}; name some of its linear layers "
                                  f"({', '.join(leaves)}), or use auto or all-linear")
    return requested


def _block_list(model) -> torch.nn.ModuleList:
    """The list of transformer blocks (model.layers, transformer.h, gpt_neox.layers, ...)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers):
            return m
    raise ConfigError(f"finetuning_type=freeze: found no list of {n_layers} transformer blocks in "
                      f"{type(model).__name__}")


def _head_name(model) -> str | None:
    """Name of the child module on top of the backbone (``score`` for sequence classification)."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [n for n, _ in model.named_children() if n != prefix]
    return heads[-1] if heads else None


def _fix_4bit_cpu_trap(model) -> int:
    """docs/known_traps.md: on CPUs with AVX512-BF16, a no-grad eval forward repacks Linear4bit weights
    for good and later backward passes give LoRA wrong or no gradients. Switch that repacking off."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


# ---------------------------------------------------------------------------
# adapters


def _adapter_files(folder: str) -> tuple[Path, Path]:
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ModelPathError(f"adapter folder {folder} does not exist")
    cfg = p / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ModelPathError(f"adapter folder {folder} has no {ADAPTER_CONFIG}")
    for w in ADAPTER_WEIGHTS:
        if (p / w).is_file():
            return cfg, p / w
    raise ModelPathError(f"adapter folder {folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors/torch name no file: say which one
        raise AdapterError(f"{path}: damaged adapter weights, not readable ({e}); rerun the stage that wrote "
                           f"{path.parent}") from e


def load_score_head(folder: str, dtype=torch.float32) -> torch.nn.Linear:
    """The score head saved in an RM adapter folder (LoRA ``modules_to_save``) as a ``torch.nn.Linear``."""
    _, weights = _adapter_files(folder)
    sd = _read_weights(weights)
    w = [k for k in sd if re.search(r"(^|\.)score\.weight$", k)]
    if len(w) != 1:
        raise AdapterError(f"adapter folder {folder} holds no score head (expected one '...score.weight' in "
                           f"{weights.name}, found {len(w)}); was it written by `rlhf rm`?")
    weight = sd[w[0]]
    bias = sd.get(w[0][: -len("weight")] + "bias")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight.to(dtype))
        if bias is not None:
            head.bias.copy_(bias.to(dtype))
    return head


def _adapter_parameters(model, name: str) -> list[torch.nn.Parameter]:
    """The parameters that belong to adapter ``name`` (LoRA matrices and its modules_to_save copies)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    params = []
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in m.adapter_layer_names:
                store = getattr(m, attr, None)
                if store is not None and name in store:
                    sub = store[name]
                    params += list(sub.parameters()) if isinstance(sub, torch.nn.Module) else [sub]
        elif isinstance(m, AuxiliaryTrainingWrapper):
            store = getattr(m, "modules_to_save", None)
            if store is not None and name in store:
                params += list(store[name].parameters())
    return params


def set_active_adapter(model, name: str) -> None:
    """Make ``name`` the active adapter without changing which adapters train.

    peft's ``set_adapter`` (and trl's ``use_adapter``) make the active adapter trainable and
    every other one frozen; this keeps each parameter's ``requires_grad`` as the loader set it.
    """
    flags = [(p, p.requires_grad) for n, p in model.named_parameters()]
    model.set_adapter(name)
    for p, rg in flags:
        p.requires_grad_(rg)


@contextlib.contextmanager
def use_adapter(model, name: str):
    """``with use_adapter(model, "ref"): ...`` runs with adapter ``name`` active, then restores the previous one;
    ``requires_grad`` flags are kept (see ``set_active_adapter``)."""
    previous = model.active_adapter
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, previous)


def _new_lora_config(cfg, model, task_type: str, modules_to_save):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg.lora_target),
        task_type=task_type,
        modules_to_save=modules_to_save,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 style (in, out) weights
        bias="none",
    )


def _folder_lora_config(folder: str, task_type: str, modules_to_save, model):
    """The adapter's own config (r, alpha, targets), re-aimed at this model's head.

    Saved modules this model lacks (an RM folder's ``score`` on a causal LM) are dropped: the LoRA part
    loads, and ``load_score_head`` reads the head. Returns (config, dropped module names).
    """
    from peft import PeftConfig

    cfg_path, _ = _adapter_files(folder)
    try:
        pcfg = PeftConfig.from_pretrained(str(cfg_path.parent))
    except Exception as e:  # noqa: BLE001 - surface peft's reason with the file name
        raise AdapterError(f"{cfg_path}: damaged, not a readable peft adapter config ({e}); rerun the stage that "
                           f"wrote {folder}") from e
    saved = list(getattr(pcfg, "modules_to_save", None) or [])
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = pcfg.target_modules
    if isinstance(targets, (list, set)) and not {t.rsplit(".", 1)[-1] for t in targets} & present:
        raise AdapterError(f"{cfg_path}: the adapter targets {', '.join(sorted(targets))}, layers this "
                           f"{_model_type(model) or 'base model'} does not have; was it trained on another base?")
    dropped = [m for m in saved if m not in present]
    saved = [m for m in saved if m in present]
    for m in modules_to_save or []:
        if m not in saved:
            saved.append(m)
    if hasattr(pcfg, "modules_to_save"):
        pcfg.modules_to_save = saved or None
    pcfg.task_type = task_type
    pcfg.inference_mode = False
    return pcfg, dropped


def load_adapter_weights(model, name: str, folder, dropped=()) -> None:
    """Put the folder's weights into adapter ``name`` (a stage folder, or a checkpoint's adapter: rlhf/roles.py);
    modules it does not hold (a score head added with ``modules_to_save``) keep their fresh values, and weights of
    the ``dropped`` modules are ignored. Refuses weights that do not fit the base (missing, unknown, other shape)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _, weights = _adapter_files(folder)
    saved = _read_weights(weights)
    if dropped:
        saved = {k: v for k, v in saved.items() if not set(k.split(".")) & set(dropped)}
    state = get_peft_model_state_dict(model, adapter_name=name)
    unexpected = sorted(set(saved) - set(state))
    missing = sorted(k for k in set(state) - set(saved) if "lora_" in k)
    if unexpected or missing:
        what = (f"{len(missing)} LoRA weights missing (e.g. {missing[0]})" if missing
                else f"{len(unexpected)} weights fit no layer (e.g. {unexpected[0]})")
        raise AdapterError(f"{weights}: the adapter does not fit this base model: {what}; was it trained on another "
                           "base?")
    bad = [k for k in saved if saved[k].shape != state[k].shape]
    if bad:
        raise AdapterError(f"{weights}: the adapter does not fit this base model: {bad[0]} has shape "
                         f"{tuple(saved[bad[0]].shape)}, the model expects {tuple(state[bad[0]].shape)}")
    state.update(saved)
    set_peft_model_state_dict(model, state, adapter_name=name)


def _attach_adapters(model, cfg, adapters, head: str, for_training: bool):
    from peft import PeftModel, get_peft_model

    task_type = "SEQ_CLS" if head == "score" else "CAUSAL_LM"
    head_name = _head_name(model) if head == "score" else None
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    peft_model = None
    for spec in adapters:
        to_save = list(spec.modules_to_save or [])
        if head_name and head_name not in to_save:
            to_save.append(head_name)  # a score model's adapter always carries its head
        if spec.folder is None:
            pcfg, dropped = _new_lora_config(cfg, model, task_type, to_save or None), []
        else:
            pcfg, dropped = _folder_lora_config(spec.folder, task_type, to_save, model)
        if peft_model is None:
            peft_model = get_peft_model(model, pcfg, adapter_name=spec.name)
        else:
            peft_model.add_adapter(spec.name, pcfg)
        if spec.folder is not None:
            load_adapter_weights(peft_model, spec.name, spec.folder, dropped)
        saved = peft_model.peft_config[spec.name].modules_to_save
        if saved:  # peft appends its classifier names even when present: keep each once
            peft_model.peft_config[spec.name].modules_to_save = list(dict.fromkeys(saved))
    assert isinstance(peft_model, PeftModel)
    peft_model.set_adapter(adapters[0].name)
    for n, p in peft_model.named_parameters():  # base frozen (LoRA), then each adapter as asked
        p.requires_grad_(False)
    for spec in adapters:
        for p in _adapter_parameters(peft_model, spec.name):
            p.requires_grad_(bool(spec.trainable and for_training))
    return peft_model


# ---------------------------------------------------------------------------
# the loader


def _zero3() -> bool:
    """Is DeepSpeed ZeRO-3 on? (True once the stage's TrainingArguments exist under a ZeRO-3 launch config)"""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _device_map(quantized: bool):
    if _zero3():
        return None  # ZeRO-3 places and shards the weights itself while they load (zero.Init)
    if not torch.cuda.is_available():
        return "cpu"
    from rlhf.dist import process_state

    return {"": process_state().local_process_index}


@contextlib.contextmanager
def trainable_dtypes_kept(model):
    """``with trainable_dtypes_kept(model): trainer = SFTTrainer(model, ...)``: trl's trainers cast a quantized
    model's trainable weights to bf16 (QLoRA's bf16 compute). That breaks a float32 score head on fp32 hidden states
    (a matmul of two dtypes) and rounds every update of fp32 LoRA weights to bf16; the loader's dtypes (fp32
    master weights, as peft's autocast_adapter_dtype) are put back. docs/quantization.md."""
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    yield model
    for n, p in model.named_parameters():
        if n in dtypes and p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])


def _quantization_config(cfg, dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else resolve_dtype(cfg.bnb_4bit_compute_dtype)
        # ZeRO-3 and FSDP shard every weight as flat tensors of one dtype: the packed 4-bit weights are stored in
        # the model's dtype then (bnb_4bit_quant_storage), as in transformers' QLoRA + ZeRO-3/FSDP recipe
        from rlhf.dist import fsdp_launch

        storage = {"bnb_4bit_quant_storage": dtype} if _zero3() or fsdp_launch() else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=compute, **storage)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantization not in ("none", "auto", "", None):
        raise ConfigError(f"quantization '{cfg.quantization}' is not known; use 4bit, 8bit or none")
    return None


def _pad_token_id(path: str, config, trust_remote_code: bool, adapters) -> int | None:
    """The pad id a score head reads past (docs/score_token.md): the pad of the tokenizer the stage pads its batches
    with -- the one saved in the first adapter's folder, else the base's -- then config.json's, then eos."""
    for folder in [a.folder for a in adapters if a.folder][:1] + [path]:
        if Path(folder, "tokenizer_config.json").is_file() or not Path(folder).exists():
            try:
                return load_tokenizer(folder, trust_remote_code).pad_token_id
            except Exception:  # noqa: BLE001 - no usable tokenizer there: try the next source
                pass
    if getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    eos = getattr(config, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def _freeze_all_but_last_blocks(model, n: int, head: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = _block_list(model)
    if not 0 < n <= len(blocks):
        raise ConfigError(f"freeze_trainable_layers={n}: the model has {len(blocks)} blocks; choose 1..{len(blocks)}")
    for b in blocks[-n:]:
        b.requires_grad_(True)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in _FINAL_NORMS:
        if isinstance(getattr(backbone, name, None), torch.nn.Module):
            getattr(backbone, name).requires_grad_(True)
            break
    if head == "score":
        getattr(model, _head_name(model)).requires_grad_(True)


def check_lora_targets(cfg, path: str | None = None) -> None:
    """Check named lora_target modules on an empty (meta-device) copy of the model, before any weight loads (a
    stage calls it before it makes its working folder)."""
    path = path or _check_base_path(cfg.model_name_or_path)
    names = [cfg.lora_target] if isinstance(cfg.lora_target, str) else list(cfg.lora_target or [])
    if not names or names in (["auto"], ["all-linear"]):
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - no skeleton to check on: the real load reports the problem
        return
    lora_targets(skeleton, names)


def load_model(cfg, *, head: str = "lm", adapters=(), for_training: bool = True, num_labels: int = 1):
    """Build the model a stage trains or runs, from ``cfg`` (an ``rlhf.config.ModelConfig``).

    head: "lm" (causal LM) or "score" (sequence classification with ``num_labels`` outputs, pad id set).
    adapters: ``AdapterSpec``s; with any, a ``peft.PeftModel`` carrying them all (the first active) comes back,
    else the plain transformers model. for_training: train mode, gradient checkpointing and trainable parameters
    as configured; else eval mode with every parameter frozen.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if head not in ("lm", "score"):
        raise ValueError(f"head '{head}' is not known; use lm or score")
    adapters = list(adapters)
    quantized = cfg.quantization in ("4bit", "8bit")
    if cfg.finetuning_type != "lora":
        if quantized:
            raise ConfigError(f"finetuning_type={cfg.finetuning_type} trains the base weights, which cannot be "
                             f"{cfg.quantization}-quantized; set quantization: none or finetuning_type: lora")
        if adapters:
            raise ConfigError(f"finetuning_type={cfg.finetuning_type} trains the base weights; adapters "
                             f"{[a.name for a in adapters]} need finetuning_type: lora")
    path = _check_base_path(cfg.model_name_or_path)
    dtype = resolve_dtype(cfg.dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, device_map=_device_map(quantized))
    qcfg = _quantization_config(cfg, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        if head == "score":
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            pad_id = _pad_token_id(path, config, cfg.trust_remote_code, adapters)
            if pad_id is None:
                raise ModelPathError(f"{path}: a score model needs a pad token id and the model has neither a "
                                 f"pad_token_id/eos_token_id in config.json nor a tokenizer with pad/eos; add one")
            kwargs.update(num_labels=num_labels, pad_token_id=pad_id)
            # transformers reports the base's head as unexpected and the score head as missing, in a table; both are
            # expected here (the score head is trained by rlhf rm, or comes with the adapter loaded next)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)
            model.config.pad_token_id = kwargs["pad_token_id"]
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelPathError(f"could not load base model '{path}': {e}") from e
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise _remote_code_refused(path) from e

    if cfg.quantization == "4bit":
        _fix_4bit_cpu_trap(model)
    from rlhf.stability import apply_stability

    apply_stability(model, cfg)
    checkpointing = bool(for_training and cfg.gradient_checkpointing)
    gc_kwargs = {"use_reentrant": cfg.gradient_checkpointing_reentrant}
    if for_training and quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)  # transformers 5 name
        if adapters:
            model.enable_input_require_grads()
    if checkpointing:
        model.config.use_cache = False

    if cfg.finetuning_type == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        if adapters:
            model = _attach_adapters(model, cfg, adapters, head, for_training)
    elif cfg.finetuning_type == "freeze":
        _freeze_all_but_last_blocks(model, cfg.freeze_trainable_layers, head)
    elif cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ConfigError(f"finetuning_type '{cfg.finetuning_type}' is not known; use lora, full or freeze")

    if for_training:
        model.train()
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    trainable, total = trainable_parameters(model)
    log.info("model %s (%s head): %s / %s parameters trainable (%.2f%%), quantization %s, dtype %s%s",
             path, head, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), cfg.quantization,
             str(dtype).replace("torch.", ""), f", adapters {[a.name for a in adapters]}" if adapters else "")
    return model
