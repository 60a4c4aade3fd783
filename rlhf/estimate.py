"""`rlhf estimate`: training memory of each stage, broken into weights, gradients, optimizer state and
activations, for full fine-tuning, LoRA and QLoRA; and the settings that fit a given GPU.

Pure arithmetic on a model's shape (no torch import at module level); ``measure_peak`` measures the same
quantity on a real run. All sizes are bytes; the CLI prints GiB (2**30 bytes, as nvidia-smi and torch report).

The model
---------
Shape: vocabulary V, hidden h, layers L, heads a (kv heads g, head dim d = h/a unless the config sets head_dim,
query width q = a*d, kv width k = g*d), MLP width I (gated SiLU MLP for llama-like models: gate, up, down; else two
matrices). Parameters
  P = V*h (embedding) + [V*h lm head unless tied] + L * (attention 2*h*q + 2*h*k, MLP 3*h*I or 2*h*I, norms)
(LLaMA-7B: 6.74e9, 65B: 65.2e9, as the LLaMA paper's Table 2). "Block linears" are the matrices inside the
layers; they are what bitsandbytes quantizes (embeddings, norms and the lm head stay unquantized).
Read from any causal LM's config.json (shape_from_config; tests/test_estimate.py checks the count against the model
transformers builds from it, for llama with GQA, head_dim and biases, qwen2 tied and untied, mistral, gpt2, gpt_neox,
bloom).

Per method, bytes per parameter (P_lin = block linears, P_rest = the others, T = trainable LoRA parameters):

  method       weights                           grads      optimizer (AdamW: 2 fp32 moments = 8 B)
  full_fp32    4 P                               4 P        8 P                     -> 16 B/param
  full_16bit   2 P                               2 P        8 P                     -> 12 B/param  [1]
  full_amp     2 P + 4 P fp32 master copy        2 P        8 P                     -> 16 B/param  [2]
  lora         2 P (16-bit base) + 4 T           4 T        8 T
  qlora_8bit   1 P_lin (+4 B/row) + 4 P_rest + 4 T   4 T    8 T                     (LLM.int8)
  qlora_4bit   (0.5 + c) P_lin + 4 P_rest + 4 T  4 T        8 T                     (NF4/FP4, blocks of 64)
                 c = 4/64 B = 0.5 bit/param for the fp32 block constants; with double quantization
                 c = 1/64 + 4/(64*256) B = 0.127 bit/param (saves 0.373 bit/param, ~3 GB on 65B)  [1]
                 (nf4_bytes counts it per matrix, with the small per-matrix code tables)

LoRA parameters are fp32 (peft keeps adapters in fp32 on a 16-bit base); quantized training keeps P_rest in fp32
(peft's prepare_model_for_kbit_training upcasts them). 8-bit optimizers (bitsandbytes adamw_bnb_8bit,
paged_adamw_8bit) store 2 B/param instead of 8 (plus one fp32 constant per block of 256; tensors under 4096 values
keep 32-bit states, which the estimate ignores); "paged" optimizers
have the same size but can spill to CPU memory under pressure. torch's foreach AdamW (the GPU default) needs one
moment-sized temporary during the step (4 B per trainable param; per tensor on CPU, where it loops).

Activations (the tensors autograd saves), bytes per token per layer, activation width A (4 fp32; 2 with 16-bit
compute, i.e. 16-bit weights or bf16/fp16 autocast); counted on transformers' Llama with
torch.autograd.graph.saved_tensors_hooks:
  full    norms 2 * (4h [the RMSNorm's input, upcast to fp32] + 2*A*h [normalised, output])
          attention A*(2h + 2k) (q, k, v and the output of the fused kernel) + 4*a (log-sum-exp)
          MLP A*4I (gate, up, SiLU, product; non-gated: A*2I)
  LoRA    norms 2 * 4h, attention as above, MLP A*3I (+A*I when down_proj has LoRA);
          + A*h per distinct input of the adapted layers (without dropout); per adapted layer A*r (the A output), and
          with lora_dropout > 0 a dropped copy of its input (A*d_in) and the mask (1*d_in)
  QLoRA   as LoRA; bitsandbytes' int8 matmul also keeps every linear layer's input, A*(3h + I)
  eager attention: q, k, v and the probabilities, A*(h + 2k) + a*s*(4 + A) (softmax in fp32, then cast) --
          quadratic in s.
  Gradient checkpointing keeps only each layer's input (A*h) and recomputes one layer at a time.
Outside the layers, per token: the final norm, and the loss's peak -- fp32 log-softmax, its gradient and the logits'
gradient (4V each) and, in 16-bit, the gradient cast back (A*V). Inside one layer's backward: gradients of its input
and output and two MLP-wide tensors, A*(2h + 2I).
Peak (the Trainer's order: forward, backward, optimizer step, gradients freed):
  weights + optimizer + max(activations + gradients kept by accumulation,
                            gradients + what is still alive when the backward reaches the first layer,
                            gradients + the optimizer step's temporary)
QLoRA's hidden states: prepare_model_for_kbit_training keeps embeddings and norms in fp32, so without autocast (a CPU
run) they are fp32 (act_bytes=4); with bf16 autocast (GPU, `bf16: true`) most are 16-bit, which the default assumes.

For PPO (stages/ppo.py) the one-base design holds the base once with four adapters (policy and value trainable,
ref and reward frozen); the four-copies design (trl <= 1.12: policy, reference, reward and value models) holds
the base four times. Activations: one policy pass over prompt + response, logits over the response only
(backpropagated before the value pass); the rollout holds the KV cache (2 * L * k * A per token of the generation
batch), the sampled step's logits and one layer of the no-grad passes.

Published anchors (tests/test_estimate.py checks each):
[1] Dettmers et al. 2023, QLoRA (arXiv:2305.14314): full 16-bit fine-tuning of LLaMA-65B needs "more than 780 GB"
    (16-bit weights and gradients, 32-bit Adam: 12 B/param * 65.2e9 = 782 GB); QLoRA fits it on one 48 GB GPU;
    double quantization saves 0.373 bit/param, "approximately 3 GB for a 65B model".
[2] Rajbhandari et al. 2020, ZeRO (arXiv:1910.02054): mixed-precision Adam holds 2 + 2 + 12 = 16 B/param,
    "120GB" for a 7.5B model.
[3] Korthikanti et al. 2022 (arXiv:2205.05198): activations per layer are linear in s*b*h plus a*s^2*b for
    attention that stores its scores; the counts above follow its method for the Llama block.
Measured: tests/test_estimate.py compares the estimate with the peak bytes of live tensors of tiny Llamas trained
on CPU (full, LoRA, QLoRA 4/8-bit, checkpointing, dropout, eager attention, bf16, RM): within 12% (0.92-1.08 seen).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlhf.config import DEFAULT_LORA_TARGETS, ConfigError, DataConfig, ModelConfig, TrainConfig

GIB = 2**30
METHODS = ("full_fp32", "full_16bit", "full_amp", "lora", "qlora_8bit", "qlora_4bit")
METHOD_HELP = {
    "full_fp32": "full fine-tuning, fp32",
    "full_16bit": "full, 16-bit weights+grads",
    "full_amp": "full, mixed precision + fp32 master",
    "lora": "LoRA on a 16-bit base",
    "qlora_8bit": "QLoRA 8-bit (LLM.int8) base",
    "qlora_4bit": "QLoRA 4-bit NF4 + double quant",
}
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "phi3", "olmo", "olmo2", "deepseek", "yi",
         "baichuan", "internlm", "internlm2"}


# ---------------------------------------------------------------------------------------------------------------
# Model shapes


@dataclass
class Shape:
    """What the estimate needs to know about a causal LM."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    gated: bool = True  # llama-style gate/up/down MLP
    tied: bool = False  # lm head shares the embedding
    arch: str = "llama"  # parameter naming: llama, gpt2, gpt_neox, bloom
    norm: str = "rms"  # rms (one weight) or layer (weight + bias)
    bias: bool = False  # biases on every block linear (gpt2, gpt_neox, bloom)
    qkv_bias: bool = False  # biases on q, k, v only (qwen2)
    positions: int = 0  # learned position embeddings (gpt2)
    head_dim: int = 0  # per-head width when the config sets it apart from hidden / heads (0: hidden // heads)
    bias_on: tuple[str, ...] = ()  # further linears with a bias (llama's attention_bias, mlp_bias)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each linear layer in one block, named as the architecture names them."""
        h, k, i, q = self.hidden, self.kv_dim, self.intermediate, self.q_dim
        if self.arch == "gpt2":
            return [("c_attn", h, 3 * h), ("attn.c_proj", h, h), ("c_fc", h, i), ("mlp.c_proj", i, h)]
        if self.arch in ("gpt_neox", "bloom"):
            mlp = ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h)
            return [("query_key_value", h, 3 * h), ("dense", h, h), *mlp]
        gate = [("gate_proj", h, i)] if self.gated else []
        mlp = [*gate, ("up_proj", h, i), ("down_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, k), ("v_proj", h, k), ("o_proj", q, h), *mlp]

    def linear_params(self) -> int:
        """Weights of the block linears (what 4/8-bit quantization packs), all layers."""
        return self.layers * sum(a * b for _, a, b in self.linears())

    def params(self) -> int:
        h = self.hidden
        norm = h if self.norm == "rms" else 2 * h
        per_layer = sum(a * b for _, a, b in self.linears()) + 2 * norm
        if self.bias:
            per_layer += sum(b for _, _, b in self.linears())
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        per_layer += sum(b for n, _, b in self.linears() if n in self.bias_on)
        total = self.layers * per_layer + self.vocab * h * (1 if self.tied else 2) + norm + self.positions * h
        if self.arch == "bloom":
            total += 2 * h  # the layer norm after the word embeddings
        return total


# LLaMA-1 (Touvron et al. 2023, Table 2) and Llama-2-70B / TinyLlama-1.1B, by their published configs.
# Current open models, by the config.json of each on the Hugging Face hub (hidden, layers, heads, kv heads, MLP, vocab,
# tied): meta-llama/Llama-3.1-8B and -70B (Llama 3.2/3.3 share these shapes), Qwen/Qwen2.5-7B and -72B (q/k/v biases;
# the 0.5B-3B sizes tie their embeddings, these do not), mistralai/Mistral-7B-v0.1 (v0.3: vocab 32768).
# Totals as published on the model cards: 8.03B, 70.6B, 7.62B, 72.7B, 7.24B (tests/test_estimate.py checks to 1%).
NAMED = {
    "1b": Shape("TinyLlama-1.1B", 32000, 2048, 22, 32, 4, 5632),
    "7b": Shape("LLaMA-7B", 32000, 4096, 32, 32, 32, 11008),
    "13b": Shape("LLaMA-13B", 32000, 5120, 40, 40, 40, 13824),
    "30b": Shape("LLaMA-33B", 32000, 6656, 60, 52, 52, 17920),
    "65b": Shape("LLaMA-65B", 32000, 8192, 80, 64, 64, 22016),
    "70b": Shape("Llama-2-70B", 32000, 8192, 80, 64, 8, 28672),
    "llama3-8b": Shape("Llama-3.1-8B", 128256, 4096, 32, 32, 8, 14336),
    "llama3-70b": Shape("Llama-3.1-70B", 128256, 8192, 80, 64, 8, 28672),
    "qwen2.5-7b": Shape("Qwen2.5-7B", 152064, 3584, 28, 28, 4, 18944, qkv_bias=True),
    "qwen2.5-72b": Shape("Qwen2.5-72B", 152064, 8192, 80, 64, 8, 29568, qkv_bias=True),
    "mistral-7b": Shape("Mistral-7B-v0.1", 32000, 4096, 32, 32, 8, 14336),
}
NAMED["33b"] = NAMED["30b"]
# the spellings users type: 8b is Llama-3.1's 8B (there is no LLaMA-1/2 8B); llama3.x-, qwen2-, hub-style names
ALIASES = {"8b": "llama3-8b", "llama3.1-8b": "llama3-8b", "llama-3.1-8b": "llama3-8b",
           "llama3.1-70b": "llama3-70b", "llama3.3-70b": "llama3-70b", "llama-3.1-70b": "llama3-70b",
           "llama-3.3-70b": "llama3-70b", "qwen2.5-7b-instruct": "qwen2.5-7b", "qwen2.5-72b-instruct": "qwen2.5-72b",
           "mistral-7b-v0.1": "mistral-7b", "llama-2-70b": "70b", "llama2-70b": "70b", "llama-2-7b": "7b",
           "llama2-7b": "7b", "llama-2-13b": "13b", "llama2-13b": "13b"}


def shape_from_config(cfg: dict, name: str = "model") -> Shape:
    """A Shape from a transformers config.json (as a dict)."""

    def get(*keys, default=None):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is None:
            raise ConfigError(f"{name}: config has none of the keys {keys}; is it a causal LM's config.json?")
        return default

    mt = cfg.get("model_type", "")
    h = int(get("hidden_size", "n_embd", "n_embed", "d_model"))  # bloom's published configs say n_embed
    heads = int(get("num_attention_heads", "n_head"))
    arch = mt if mt in ("gpt2", "gpt_neox", "bloom") else "llama"
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h
    return Shape(
        name=name,
        vocab=int(get("vocab_size")),
        hidden=h,
        layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate=int(inter),
        gated=arch == "llama" and (mt in GATED or "intermediate_size" in cfg
                                   and mt not in ("gpt2", "gpt_neox", "bloom", "opt")),
        tied=bool(cfg.get("tie_word_embeddings", arch in ("gpt2", "bloom"))),
        arch=arch,
        norm="rms" if arch == "llama" else "layer",
        bias=arch != "llama",
        qkv_bias=mt == "qwen2",
        positions=int(cfg.get("n_positions", 0)) if arch == "gpt2" else 0,
        head_dim=int(cfg.get("head_dim") or 0) if arch == "llama" else 0,  # e.g. Mistral-Nemo: 128 with hidden 5120
        bias_on=(("q_proj", "k_proj", "v_proj", "o_proj") if cfg.get("attention_bias") and arch == "llama" else ())
        + (("gate_proj", "up_proj", "down_proj") if cfg.get("mlp_bias") and arch == "llama" else ()),
    )


def load_shape(model: str) -> Shape:
    """A named size (NAMED, ALIASES: 7b, 8b, qwen2.5-7b, mistral-7b ...), a model folder, a config.json, or a hub id
    (needs its config)."""
    key = model.lower()
    key = ALIASES.get(key, key if key in NAMED else key.replace("llama-", ""))  # llama-7b: the LLaMA-1 size
    if key in NAMED:
        return NAMED[key]
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return shape_from_config(cfg, str(model))
    if Path(model).expanduser().exists():
        raise ConfigError(f"{model}: no config.json there; give a transformers model folder, a config.json or a named "
                          "size")
    try:
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(model).to_dict(), model)
    except Exception as e:  # noqa: BLE001 - the hub may be unreachable: say what the choices are
        raise ConfigError(f"'{model}' is not a named size ({', '.join(sorted(NAMED))}), a model folder or a "
                          f"config.json, and its hub config could not be read ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Settings and the estimate


def default_of(cls, name: str):
    """The default of config key ``name`` in ``cls`` (rlhf/config.py): the estimate's knobs default as the stages'."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _knob(cls, name: str):
    return field(default_factory=lambda: default_of(cls, name))


@dataclass
class Setup:
    """How a stage trains: method, batch, sequence, LoRA and optimizer. The fields named as config keys (or after
    them: batch_size is per_device_train_batch_size, seq_len max_length, double_quant bnb_4bit_use_double_quant)
    default as those keys do; ``setup_from_config`` reads a stage's config."""

    method: str = "qlora_4bit"
    batch_size: int = _knob(TrainConfig, "per_device_train_batch_size")
    seq_len: int = _knob(DataConfig, "max_length")  # tokens per sequence (PPO: the prompt)
    gradient_checkpointing: bool = _knob(ModelConfig, "gradient_checkpointing")
    gradient_accumulation_steps: int = _knob(TrainConfig, "gradient_accumulation_steps")
    optim: str = _knob(TrainConfig, "optim")
    lora_r: int = _knob(ModelConfig, "lora_r")
    lora_target: list[str] = _knob(ModelConfig, "lora_target")
    lora_dropout: float = _knob(ModelConfig, "lora_dropout")
    double_quant: bool = _knob(ModelConfig, "bnb_4bit_use_double_quant")
    # attn_implementation: sdpa (transformers' default) / flash_attention_2 (no stored scores) or eager
    attn: str = "sdpa"
    act_bytes: int | None = None  # activation width; None: 4 for full_fp32, else 2 (16-bit compute)
    base_bytes: int | None = None  # width of unquantized frozen/full weights; None: as the method says (4 on a CPU run)
    device: str = "cuda"  # cuda: foreach AdamW temporary; cpu: per-tensor loop

    def validate(self):
        if self.method not in METHODS:
            raise ConfigError(f"method '{self.method}' is not known; use one of {', '.join(METHODS)}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim '{self.optim}' is not known to the estimate; use one of {', '.join(OPTIMIZERS)}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        return self


QUANT_METHOD = {"none": "lora", "auto": "lora", "4bit": "qlora_4bit", "8bit": "qlora_8bit"}


def setup_from_config(cfg, stage: str = "sft", device: str = "cuda") -> tuple[Setup, dict]:
    """The Setup a stage's config trains with (an SFTConfig, RMConfig or PPOConfig: rlhf/config.py's keys, and for
    ppo its batch keys), and for ppo the ``estimate_ppo`` keywords. ``quantization: auto`` must be resolved first
    (rlhf.config.inherit_quantization); left as auto it means none, as for a stage without a parent.

    Widths as the loader builds them (rlhf/loader.py): dtype auto is bf16 on a GPU, fp32 on CPU; a QLoRA base keeps
    its hidden states in fp32 (prepare_model_for_kbit_training) unless bf16/fp16 autocast is on."""
    amp = bool(cfg.bf16 or cfg.fp16)
    sixteen = cfg.dtype in ("bfloat16", "float16") or (cfg.dtype == "auto" and device == "cuda")
    act = base = None
    if cfg.finetuning_type == "full":
        method = "full_16bit" if sixteen else ("full_amp" if amp else "full_fp32")
    elif cfg.finetuning_type == "lora":
        method = QUANT_METHOD[cfg.quantization]
        if method == "lora":
            base, act = (2, 2) if sixteen else (4, 2 if amp else 4)
        else:
            act = 2 if amp else 4
    else:
        raise ConfigError(f"finetuning_type '{cfg.finetuning_type}': the estimate covers lora (LoRA/QLoRA) and full")
    keys = dict(batch_size=cfg.per_device_train_batch_size, seq_len=cfg.max_length, lora_r=cfg.lora_r,
                lora_target=list(cfg.lora_target), lora_dropout=cfg.lora_dropout,
                gradient_checkpointing=cfg.gradient_checkpointing, optim=cfg.optim,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, double_quant=cfg.bnb_4bit_use_double_quant,
                attn=cfg.attn_implementation or "sdpa", act_bytes=act, base_bytes=base, device=device)
    ppo = {}
    if stage == "ppo":  # an update step: mini_batch_size samples in micro-batches; the rollout generates in chunks
        keys.update(seq_len=cfg.max_prompt_length, lora_dropout=0.0,  # stages/ppo.py turns dropout off
                    gradient_accumulation_steps=cfg.mini_batch_size // cfg.per_device_train_batch_size)
        ppo = dict(prompt_len=cfg.max_prompt_length, response_len=cfg.max_new_tokens, value_model=cfg.value_model,
                   rollout_batch=min(cfg.batch_size, cfg.per_device_eval_batch_size))
    return Setup(method=method, **keys).validate(), ppo


@dataclass
class Estimate:
    """Bytes, by component; ``peak`` follows the Trainer's order of forward, backward and optimizer step."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    step_temp: float = 0.0  # optimizer-step temporary
    held_grads: float = 0.0  # gradients alive during the backward (gradient accumulation)
    tail: float = 0.0  # activations still alive when the backward reaches the first layer (gradients nearly all made)
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def states(self) -> float:
        """Weights + gradients + optimizer: what the QLoRA paper's 780 GB counts."""
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> float:
        return self.weights + self.optimizer + max(self.activations + self.held_grads, self.gradients + self.tail,
                                                   self.gradients + self.step_temp)


def lora_modules(shape: Shape, target) -> list[tuple[str, int, int]]:
    """The block linears that get LoRA: auto (the loader's per-architecture default), all-linear, or names."""
    target = [target] if isinstance(target, str) else list(target or ["auto"])
    lin = shape.linears()
    if target == ["all-linear"]:
        return lin
    if target == ["auto"]:
        target = DEFAULT_LORA_TARGETS.get(shape.arch, DEFAULT_LORA_TARGETS["llama"])  # llama-named layers
    chosen = [m for m in lin if m[0] in target or m[0].rsplit(".", 1)[-1] in target]
    if not chosen:
        raise ConfigError(f"lora_target {target} matches no linear layer of {shape.name}; its layers: "
                          f"{', '.join(m[0] for m in lin)}")
    return chosen


def lora_params(shape: Shape, setup: Setup) -> int:
    return shape.layers * sum(setup.lora_r * (a + b) for _, a, b in lora_modules(shape, setup.lora_target))


def optimizer_bytes(optim: str, n: int) -> float:
    if optim in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        return 2 * n + 2 * 4 * math.ceil(n / 256)  # two uint8 moments + an fp32 constant per block of 256
    if optim == "sgd":
        return 0.0
    return 8.0 * n  # two fp32 moments


def _act_width(setup: Setup) -> int:
    """4 for full_fp32, else 2: 16-bit compute (bf16/fp16 autocast on a GPU). Without autocast, QLoRA through
    prepare_model_for_kbit_training keeps fp32 embeddings, so its hidden states are fp32: give act_bytes=4."""
    return setup.act_bytes or (4 if setup.method == "full_fp32" else 2)


def layer_activations(shape: Shape, setup: Setup, tokens: int, seq_len: int) -> float:
    """Bytes autograd saves in one block for ``tokens`` tokens (see the module docstring)."""
    A, h, k, I, a = _act_width(setup), shape.hidden, shape.kv_dim, shape.intermediate, shape.heads
    full = setup.method.startswith("full")
    norm_in = 4 if shape.norm == "rms" else A  # the RMSNorm computes in fp32
    if setup.attn == "eager":  # q, k, v and the probabilities (fp32 softmax, then cast)
        attn = A * (h + 2 * k) + a * seq_len * (4 + (A if A < 4 else 0))
    else:  # fused kernel: q, k, v, output and the log-sum-exp
        attn = A * (2 * h + 2 * k) + 4 * a
    if full:
        per = 2 * (norm_in * h + 2 * A * h) + attn + A * I * (4 if shape.gated else 2)
        return tokens * per
    mods = lora_modules(shape, setup.lora_target)
    names = {m[0].rsplit(".", 1)[-1] for m in mods}
    down = {"down_proj", "mlp.c_proj", "c_proj", "dense_4h_to_h"} & {m[0] for m in mods}
    int8 = setup.method == "qlora_8bit"  # bitsandbytes' int8 matmul keeps every input for its backward
    mlp = A * I * ((3 if shape.gated else 1) + (1 if down or int8 else 0))
    per = 2 * norm_in * h + attn + mlp
    if int8:
        per += A * 3 * h  # the inputs of the attention projections, the output projection and the MLP
    if setup.lora_dropout > 0:
        per += sum(A * d_in + d_in for _, d_in, _ in mods)
    elif not int8:
        attn_in = names & {"q_proj", "k_proj", "v_proj", "c_attn", "query_key_value"}
        mlp_in = names & {"gate_proj", "up_proj", "c_fc", "dense_h_to_4h"}
        out_in = names & {"o_proj", "c_proj", "dense"}
        per += A * h * (bool(attn_in) + bool(mlp_in) + bool(out_in))
    per += sum(A * setup.lora_r for _ in mods)
    return tokens * per


def activation_bytes(shape: Shape, setup: Setup, tokens: int | None = None, seq_len: int | None = None,
                     logits_tokens: int | None = None) -> float:
    """Peak bytes of activations for one micro-batch (forward kept for the backward, plus the loss's logits)."""
    s = seq_len or setup.seq_len
    tokens = tokens or setup.batch_size * s
    logits_tokens = tokens if logits_tokens is None else logits_tokens
    A, h = _act_width(setup), shape.hidden
    one = layer_activations(shape, setup, tokens, s)
    full = setup.method.startswith("full")
    final_norm = tokens * ((4 if shape.norm == "rms" else A) * h + (2 * A * h if full else A * h))
    logits = logits_tokens * logit_bytes(shape, setup)
    backward = _backward_temp(shape, setup, tokens)
    if setup.gradient_checkpointing:
        # layer inputs, then the larger of: the loss at the start of the backward, or one layer recomputed
        # with the gradients of its backward
        return shape.layers * tokens * A * h + max(final_norm + logits, one + backward)
    return shape.layers * one + max(final_norm + logits, backward)


def _backward_temp(shape: Shape, setup: Setup, tokens: int) -> float:
    """Gradients alive inside one layer's backward: its input and output, and two MLP-wide tensors."""
    return tokens * _act_width(setup) * (2 * shape.hidden + (2 if shape.gated else 1) * shape.intermediate)


def backward_tail(shape: Shape, setup: Setup, tokens: int, seq_len: int) -> float:
    """Activations alive while the backward runs through the first layer: that layer's (recomputed) tensors and the
    gradients of its backward; with gradient checkpointing also its saved input."""
    one = layer_activations(shape, setup, tokens, seq_len) + _backward_temp(shape, setup, tokens)
    return one + (tokens * _act_width(setup) * shape.hidden if setup.gradient_checkpointing else 0)


def logit_bytes(shape: Shape, setup: Setup) -> float:
    """Per token, the loss's peak: fp32 log-softmax output, its gradient and the logits' gradient (4V each), and
    in 16-bit the logits' gradient cast back (A*V)."""
    A = _act_width(setup)
    return 12 * shape.vocab + (A * shape.vocab if A < 4 else 0)


def weight_bytes(shape: Shape, setup: Setup) -> float:
    P, P_lin = shape.params(), shape.linear_params()
    m = setup.method
    if m == "full_fp32":
        return 4 * P
    if m == "full_16bit":
        return (setup.base_bytes or 2) * P
    if m == "full_amp":
        return 6 * P
    lora = 4 * lora_params(shape, setup)
    if m == "lora":
        return (setup.base_bytes or 2) * P + lora
    rest = 4 * (P - P_lin)  # prepare_model_for_kbit_training keeps non-quantized weights in fp32
    if m == "qlora_8bit":
        return P_lin + 4 * shape.layers * sum(b for _, _, b in shape.linears()) + rest + lora
    return shape.layers * sum(nf4_bytes(a * b, setup.double_quant) for _, a, b in shape.linears()) + rest + lora


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """One 4-bit weight of ``n`` values as bitsandbytes stores it: packed pairs, one absmax per block of 64 (fp32; or
    uint8 with double quantization, plus one fp32 per 256 blocks, an fp32 offset and a 256-entry fp32 code), and the
    16-entry fp32 code of the data type."""
    blocks = math.ceil(n / 64)
    consts = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + consts + 16 * 4


def estimate(shape: Shape, setup: Setup, tokens: int | None = None, seq_len: int | None = None) -> Estimate:
    """The training memory of one SFT-like step (causal-LM loss over every token)."""
    setup.validate()
    full = setup.method.startswith("full")
    trainable = shape.params() if full else lora_params(shape, setup)
    grad_w = 2 if setup.method in ("full_16bit", "full_amp") else 4
    grads = grad_w * trainable
    opt = optimizer_bytes(setup.optim, trainable)
    temp = 0.0
    if setup.optim in ("adamw_torch", "paged_adamw_32bit") and setup.device == "cuda" and setup.optim == "adamw_torch":
        temp = 4.0 * trainable
    acts = activation_bytes(shape, setup, tokens, seq_len)
    if setup.method.startswith("qlora"):
        acts += 2 * max(a * b for _, a, b in shape.linears())  # one dequantized 16-bit weight at a time
    held = grads if setup.gradient_accumulation_steps > 1 else 0.0
    tail = backward_tail(shape, setup, tokens or setup.batch_size * setup.seq_len, seq_len or setup.seq_len)
    if full:  # the first layer's and the embedding's gradients are made after that point
        tail -= grad_w * ((shape.params() - shape.vocab * shape.hidden * (1 if shape.tied else 2)) / shape.layers
                          + shape.vocab * shape.hidden)
    return Estimate(weight_bytes(shape, setup), grads, opt, acts, temp, held, tail, trainable)


def estimate_rm(shape: Shape, setup: Setup) -> Estimate:
    """Reward modelling: chosen and rejected of each pair in one batch (2x sequences); a score head, no vocab logits."""
    s2 = replace(setup, batch_size=2 * setup.batch_size)
    tokens = s2.batch_size * s2.seq_len
    e = estimate(shape, s2, tokens=tokens)
    e.activations -= tokens * logit_bytes(shape, s2)  # a score head: no logits over the vocabulary
    e.weights += (4 if not setup.method.startswith("full") else 0) * shape.hidden  # the score head (fp32, trained)
    return e


def estimate_ppo(shape: Shape, setup: Setup, *, prompt_len: int = 256, response_len: int = 64, rollout_batch: int = 16,
                 value_model: str = "adapter", design: str = "one_base") -> Estimate:
    """PPO (stages/ppo.py): the larger of the update (``setup.batch_size`` sequences of prompt + response, policy and
    value passes backpropagated one after the other) and the rollout (KV cache of ``rollout_batch`` sequences).

    design: one_base (one base carrying the policy, ref, reward and value adapters) or four_copies (the base four
    times: policy, reference, reward and value models, as trl <= 1.12's PPOTrainer). value_model: adapter (a
    trainable value adapter + head) or shared (a value head on the policy).
    """
    if design not in ("one_base", "four_copies"):
        raise ConfigError(f"design '{design}' is not known; use one_base or four_copies")
    if value_model not in ("adapter", "shared"):
        raise ConfigError(f"value_model '{value_model}' is not known; use adapter or shared")
    full = setup.method.startswith("full")
    if full and design == "one_base":
        raise ConfigError("the one-base design needs LoRA adapters; full fine-tuning in PPO means separate models "
                          "(four_copies)")
    seq = prompt_len + response_len
    e = estimate(shape, replace(setup, seq_len=seq))
    e.activations -= setup.batch_size * prompt_len * logit_bytes(shape, setup)  # logits of the response positions only
    A, h = _act_width(setup), shape.hidden
    n_lora = 0 if full else lora_params(shape, setup)
    n_roles = 2 if value_model == "adapter" or full else 1  # trainable: policy, and value unless it shares the policy
    trainable = n_roles * (shape.params() if full else n_lora) + h  # + the value head
    grad_w = 2 if setup.method in ("full_16bit", "full_amp") else 4
    e.trainable, e.gradients = trainable, grad_w * trainable
    e.optimizer = optimizer_bytes(setup.optim, trainable)
    e.step_temp = 4.0 * trainable if setup.optim == "adamw_torch" and setup.device == "cuda" else 0.0
    base = weight_bytes(shape, setup) - 4 * n_lora  # one copy of the base weights
    adapters = 4 * n_lora * (4 if value_model == "adapter" else 3)  # policy, ref, reward (+ value), fp32
    e.weights = (1 if design == "one_base" else 4) * base + adapters + 2 * 4 * h  # + reward and value heads
    # rollout: the KV cache of the generation batch at full length, the sampled step's logits, and one layer of the
    # no-grad reference/reward/value passes
    kv = 2 * shape.layers * shape.kv_dim * A * rollout_batch * seq
    rollout = kv + rollout_batch * (A + 4) * shape.vocab + rollout_batch * seq * A * (2 * h + shape.intermediate)
    e.activations = max(e.activations, rollout)
    e.tail = min(e.tail, e.activations)
    e.notes.append(f"rollout: KV cache {kv / GIB:.2f} GiB for {rollout_batch} x {seq} tokens")
    return e


def stage_estimate(stage: str, shape: Shape, setup: Setup, **ppo) -> Estimate:
    if stage == "sft":
        return estimate(shape, setup)
    if stage == "rm":
        return estimate_rm(shape, setup)
    if stage == "ppo":
        return estimate_ppo(shape, setup, **ppo)
    raise ConfigError(f"stage '{stage}' is not known; use sft, rm or ppo")


# ---------------------------------------------------------------------------------------------------------------
# Proposing settings that fit


QUANT_OF = {"lora": "none", "qlora_8bit": "8bit", "qlora_4bit": "4bit"}


def propose(shape: Shape, gpu_bytes: float, stage: str = "sft", batch_size: int = 16, seq_len: int = 512,
            headroom: float = 0.1, full: bool = False, base: Setup | None = None, **ppo):
    """The fastest settings whose peak fits in ``gpu_bytes`` less ``headroom`` (CUDA context, fragmentation).

    Preference (first differences win): 16-bit LoRA, then 4-bit, then 8-bit (int8 training is the slowest); no
    gradient checkpointing (it recomputes the forward, ~30% slower); the largest micro-batch (accumulation makes up
    ``batch_size``); 32-bit AdamW over 8-bit. With ``full``, full fine-tuning (16-bit) is tried first.
    Returns (setup, estimate) or (None, smallest estimate) when nothing fits.
    """
    base = base or Setup()
    budget = gpu_bytes * (1 - headroom)
    methods = (["full_16bit"] if full else []) + ["lora", "qlora_4bit", "qlora_8bit"]
    micro = [m for m in (64, 32, 16, 8, 4, 2, 1) if m <= batch_size] or [1]
    best_small = None
    for method in methods:
        for gc in (False, True):
            for mb in micro:
                for optim in ("adamw_torch", "paged_adamw_8bit"):
                    s = replace(base, method=method, gradient_checkpointing=gc, batch_size=mb, seq_len=seq_len,
                                optim=optim,
                                gradient_accumulation_steps=math.ceil(batch_size / mb), act_bytes=None, base_bytes=None)
                    e = stage_estimate(stage, shape, s, **ppo)
                    if best_small is None or e.peak < best_small[1].peak:
                        best_small = (s, e)
                    if e.peak <= budget:
                        return s, e
    return None, best_small[1]


def setup_to_config(s: Setup, stage: str = "sft") -> dict:
    """The config keys (rlhf/config.py, stages/ppo.py) that give ``s``."""
    out = {}
    if s.method.startswith("full"):
        out.update(finetuning_type="full", quantization="none", bf16=s.method != "full_fp32",
                   dtype="bfloat16" if s.method == "full_16bit" else "float32")
    else:
        out.update(finetuning_type="lora", quantization=QUANT_OF[s.method], bf16=True, lora_r=s.lora_r,
                   lora_target=list(s.lora_target), lora_dropout=s.lora_dropout)  # the adapter the estimate sized
        if s.method == "qlora_4bit":
            out.update(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=s.double_quant)
    out.update(gradient_checkpointing=s.gradient_checkpointing, optim=s.optim, per_device_train_batch_size=s.batch_size)
    if stage == "ppo":  # PPO accumulates mini_batch_size / per_device_train_batch_size micro-batches
        out.update(mini_batch_size=s.batch_size * s.gradient_accumulation_steps, max_prompt_length=s.seq_len)
    else:
        out.update(gradient_accumulation_steps=s.gradient_accumulation_steps, max_length=s.seq_len)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring (the same quantity on a real run)


@dataclass
class Measured:
    peak: int  # bytes of live tensors at the highest point
    start: int  # bytes of live tensors when ``fn`` started
    result: object = None


def measure_peak(fn, *args, **kwargs) -> Measured:
    """Run ``fn``; the peak bytes of live tensors while it ran, the bytes alive when it started, and its result.

    On CUDA: torch.cuda.max_memory_allocated. On CPU: every tensor alive when ``fn`` starts (found through the
    garbage collector) plus every tensor an aten op creates while it runs, each storage counted once until freed --
    the CPU analogue of max_memory_allocated (allocator caching and fragmentation are not counted).
    """
    import gc
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return Measured(torch.cuda.max_memory_allocated(), start, out)

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes: dict[int, int] = {}
            self.now = self.peak = 0

        def track(self, t):
            if t.device.type != "cpu" or t.is_meta:
                return
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
                return
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self.sizes:
                return
            self.sizes[key] = n
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self.drop, key)

        def drop(self, key):
            self.now -= self.sizes.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
            return out

    live = Live()
    gc.collect()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                live.track(obj)
        except ReferenceError:
            pass
    start = live.now
    with live:
        out = fn(*args, **kwargs)
    return Measured(live.peak, start, out)


# ---------------------------------------------------------------------------------------------------------------
# Tables for `rlhf estimate` (the command: rlhf/cli/estimate.py)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}" if x < 10 * GIB else f"{x / GIB:.1f}"


def parse_size(text: str) -> float:
    """'24' or '24GiB' (GPU memory as sold: 24 GiB), '24GB' (10^9 bytes), '800MiB' -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    units = {"gib": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40, "tb": 1e12, "": GIB}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return float(t[: len(t) - len(u)] if u else t) * units[u]
            except ValueError:
                break
    raise ConfigError(f"'{text}' is not a memory size; write e.g. 24, 24GiB, 24GB or 800MiB")


def table(stage: str, shape: Shape, base: Setup, **ppo) -> str:
    """Markdown table: every method, with and without gradient checkpointing, AdamW vs 8-bit AdamW totals."""
    rows = ["| method | grad. ckpt | weights | grads | AdamW states | activations | total AdamW | total 8-bit AdamW |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        for gc in (False, True):
            s = replace(base, method=method, gradient_checkpointing=gc, optim="adamw_torch", act_bytes=None,
                        base_bytes=None)
            try:
                e = stage_estimate(stage, shape, s, **ppo)
                e8 = stage_estimate(stage, shape, replace(s, optim="paged_adamw_8bit"), **ppo)
            except ValueError:
                continue  # e.g. full fine-tuning on one base in PPO
            rows.append(f"| {METHOD_HELP[method]} | {'yes' if gc else 'no'} | {_gib(e.weights)} | "
                        f"{_gib(e.gradients)} | "
                        f"{_gib(e.optimizer)} | {_gib(e.activations)} | {_gib(e.peak)} | {_gib(e8.peak)} |")
    rows.append("\nTotals are peaks: the weights and optimizer state, plus the larger of the activations (the "
                "backward's start) and the gradients with the optimizer step's temporary (torch's foreach AdamW: 4 B "
                "per trainable parameter).")
    return "\n".join(rows)
