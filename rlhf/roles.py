"""One base, many roles: named LoRA adapters on one (quantized) causal LM, and scalar heads read off its backbone.

The base weights exist once; a role is an adapter (e.g. PPO's ``policy``, ``ref``, ``reward``, ``value``), switched
with ``OneBase.use``. A scalar head (a reward model's score head, a critic's value head) reads the backbone's last
hidden state; the reward is read at the score token (rlhf/scoring.py, docs/score_token.md).

Which roles exist, which train and where each starts is the recipe's choice (stages/ppo.py): this module builds and
runs what it is given (``load_roles`` from ``AdapterSpec``s, heads from RM folders), and saves and loads an adapter
by name (shape-checked by the loader, rlhf/loader.py ``load_adapter_weights``) and a head in the RM folder's format.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

SCORE_PREFIX = "base_model.model.score."  # the RM folder's score head (LoRA modules_to_save=["score"])


def backbone(model):
    """The transformer under the LM head of a (PEFT-wrapped) causal LM, e.g. LlamaForCausalLM.model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class OneBase:
    """Roles as named adapters of one PeftModel; ``reward_head`` and ``value_head`` read a scalar off the
    backbone's last hidden state. `use(name)` switches the adapter and keeps the requires_grad flags the loader
    set (peft's set_adapter alone would freeze every other adapter, the trainable ones included).

    trainable: the adapters that train (checked against the loader's requires_grad flags); ``params`` is their
    parameters, then the value head's. shared_value: the value head reads the policy's hidden states (no ``value``
    adapter). temperature: log-probs are of the temperature-scaled logits (as sampled)."""

    def __init__(self, model, reward_head, value_head, *, trainable=("policy",), shared_value: bool = False,
                 temperature: float = 1.0, pad_token_id: int, autocast=contextlib.nullcontext):
        import inspect

        self.model, self.reward_head, self.value_head, self.pad_token_id = model, reward_head, value_head, pad_token_id
        self.shared_value, self.temperature = shared_value, temperature
        self.autocast = autocast  # accelerate's mixed-precision context: the same in rollout and update
        self.trainable = list(trainable)
        adapter_params = [p for p in model.parameters() if p.requires_grad]
        named = {id(p) for n, p in model.named_parameters() if any(f".{r}." in n for r in self.trainable)}
        if {id(p) for p in adapter_params} != named:
            raise RuntimeError(f"the loader left other parameters than the {self.trainable} adapters trainable")
        self.params = adapter_params + (list(value_head.parameters()) if value_head is not None else [])
        params = inspect.signature(model.get_base_model().forward).parameters
        self.pass_positions = "position_ids" in params
        self.keep_logits = "logits_to_keep" in params

    def use(self, name: str) -> None:
        from rlhf.loader import set_active_adapter

        set_active_adapter(self.model, name)

    def _inputs(self, ids, attn):
        kw = {"input_ids": ids, "attention_mask": attn}
        if self.pass_positions:  # left padding: positions count real tokens only, as generate() does
            kw["position_ids"] = (attn.cumsum(1) - 1).clamp(min=0)
        return kw

    def policy_forward(self, ids, attn, width: int, adapter: str = "policy", entropy: bool = False,
                       detach_hidden: bool = False):
        """Log-probs (temperature-scaled) of the last `width` tokens, their entropy, and the shared value if any."""
        from rlhf.rl import entropy as entropy_of, token_logprobs

        self.use(adapter)
        kw = self._inputs(ids, attn)
        if self.keep_logits:
            kw["logits_to_keep"] = width + 1
        with self.autocast():
            out = self.model(**kw, output_hidden_states=self.shared_value and adapter == "policy", use_cache=False)
        logits = out.logits[:, -width - 1 : -1].float() / self.temperature  # [N-impl]: same temperature as sampling
        logp = token_logprobs(logits, ids[:, -width:])
        ent = entropy_of(logits.detach()) if entropy else None
        values = None
        if out.hidden_states is not None:
            hidden = out.hidden_states[-1][:, -width - 1 : -1]
            hidden = hidden.detach() if detach_hidden else hidden  # critic warm-up: the value head alone learns
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logp, ent, values

    def head_forward(self, ids, attn, adapter: str, head) -> torch.Tensor:
        """head(backbone hidden state) at every position, with `adapter` active: (B, T)."""
        self.use(adapter)
        with self.autocast():
            hidden = backbone(self.model)(**self._inputs(ids, attn), use_cache=False).last_hidden_state
        return head(hidden.to(head.weight.dtype)).squeeze(-1)

    def values(self, ids, attn, width: int) -> torch.Tensor:
        """The critic's value of each state before a response token: (B, width)."""
        if self.shared_value:
            return self.policy_forward(ids, attn, width)[2]
        return self.head_forward(ids, attn, "value", self.value_head)[:, -width - 1 : -1]

    def scores(self, ids, attn) -> torch.Tensor:
        """Reward-model score of each row at its score token (rlhf.scoring: as the RM was trained and as the RM
        folder scores the same ids loaded with plain transformers + peft)."""
        from rlhf.scoring import score_positions

        s = self.head_forward(ids, attn, "reward", self.reward_head)
        return s[torch.arange(len(ids)), score_positions(ids, self.pad_token_id)]


# ---------------------------------------------------------------------------------------------------------------
# Building the roles


def load_roles(cfg, adapters):
    """The one base (rlhf.loader.load_model, causal-LM head) carrying ``adapters`` (``AdapterSpec``s), dropout off
    ([N-impl]: dropout would make the rollout's and the update's log-probs disagree)."""
    from rlhf.loader import load_model

    model = load_model(cfg, head="lm", adapters=adapters, for_training=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def load_head(folder: str, model, trainable: bool = False) -> torch.nn.Linear:
    """The score head of an RM folder (rlhf.loader.load_score_head), fp32, on ``model``'s device."""
    from rlhf.loader import load_score_head

    device = next(p for p in model.parameters()).device
    return load_score_head(folder).float().to(device).requires_grad_(trainable)


def zero_value_head(like: torch.nn.Linear) -> torch.nn.Linear:
    """A trainable scalar head with ``like``'s input width, bias and device, initialised to zero."""
    head = torch.nn.Linear(like.in_features, 1, bias=like.bias is not None).to(like.weight.device)
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return head


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading by name


def save_adapter(model, name: str, folder: Path, extra: dict | None = None, **config_changes) -> None:
    """Adapter `name` as a plain PEFT folder (adapter_config.json + adapter_model.safetensors); `extra` tensors
    (e.g. a head as modules_to_save weights) go into the same file, `config_changes` into its config."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    state.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    for k, v in config_changes.items():
        setattr(config, k, v)
    config.save_pretrained(str(folder))


def head_state(head: torch.nn.Linear) -> dict:
    """A head under the key the RM folder's score head has (LoRA modules_to_save=["score"])."""
    return {SCORE_PREFIX + k: v for k, v in head.state_dict().items()}


def save_value(roles: OneBase, folder: Path) -> None:
    """The critic: with a ``value`` adapter in the RM folder's format (AutoModelForSequenceClassification +
    PeftModel.from_pretrained(.., folder) is the critic); a shared value head as value_head.safetensors."""
    if roles.shared_value:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in roles.value_head.state_dict().items()}
        save_file(state, str(folder / "value_head.safetensors"))
    else:
        save_adapter(roles.model, "value", folder, extra=head_state(roles.value_head), task_type="SEQ_CLS",
                     modules_to_save=["score"])


def load_value(roles: OneBase, folder: Path) -> None:
    from safetensors.torch import load_file

    from rlhf.loader import load_adapter_weights

    if roles.shared_value:
        state = load_file(str(folder / "value_head.safetensors"))
    else:
        load_adapter_weights(roles.model, "value", folder, dropped=["score"])  # the head is read below
        state = {k[len(SCORE_PREFIX) :]: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
                 if k.startswith(SCORE_PREFIX)}
    roles.value_head.load_state_dict(state)
