"""A finished stage folder opened as the model it stands for (`rlhf chat/generate/eval/score/export` read it so).

An SFT or PPO folder is a policy (its LoRA adapter on the base named in the manifest), an RM folder a scorer
(its adapter and score head), a ``pt`` folder or a full/freeze fine-tune holds whole weights. Text is rendered
with the folder's own tokenizer and chat template.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

POLICIES = ("pt", "sft", "ppo", "dpo", "grpo")  # folders that generate text
POLICY_ADAPTERS = ("sft", "dpo", "grpo", "ppo")  # folders whose root adapter is a policy an RL stage starts from
SCORERS = ("rm",)  # folders that score it


@dataclass
class Stage:
    """An opened stage folder: what it is and where its weights are."""

    folder: str
    stage: str  # pt, sft, rm, ppo
    manifest: dict
    base: str  # folder or hub id of the weights the adapter goes on (the folder itself when it has whole weights)
    adapter: str | None  # folder of the LoRA adapter, None for whole weights

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def head(self) -> str:
        return "score" if self.stage == "rm" else "lm"

    @property
    def quantization(self) -> str:
        return self.config.get("quantization") or "none"


def open_stage(folder: str, kinds: tuple[str, ...], command: str, base: str | None = None) -> Stage:
    """Check that ``folder`` is a finished stage output of one of ``kinds`` and say how to load it. ``base`` (the
    user's --base) is the recorded base model in another place; it must have the recorded fingerprint."""
    from rlhf.manifest import StageError, check_parent

    f = Path(folder)
    if f.is_dir() and not (f / "manifest.json").is_file() and (f / "config.json").is_file():
        raise StageError(f"{folder} is not a stage folder (no manifest.json) but a plain transformers model "
                         f"(an `rlhf export` output?): load it with transformers; {command} takes the stage folder "
                         f"it came from")
    m = check_parent(folder, POLICIES + SCORERS, for_stage=command, base_model=base,  # exists, finished, files,
                     base_option="--base")  # the base is there
    if m["stage"] not in kinds:
        if m["stage"] == "rm":
            raise StageError(f"{folder} is a reward model (`rlhf rm` output): it scores text, it does not write it; "
                             f"{command} needs a {'/'.join(kinds)} folder (score replies with `rlhf score` or "
                             f"`rlhf eval {folder}`)")
        raise StageError(f"{folder} is the output of `rlhf {m['stage']}`, but {command} needs a {'/'.join(kinds)} "
                         "folder")
    return _stage(folder, m, base)


def _stage(folder: str, m: dict, base: str | None = None) -> Stage:
    lora = m["stage"] != "pt" and m.get("config", {}).get("finetuning_type", "lora") == "lora"
    return Stage(str(folder), m["stage"], m, (base or m["base_model"]["path"]) if lora else str(folder),
                 str(folder) if lora else None)


def load_stage(st: Stage, *, quantization: str = "stage", dtype: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) of a stage folder in eval mode. quantization "stage": as the stage trained.
    Remote code runs only when the caller (the user's --trust-remote-code) says so, never from the manifest."""
    from rlhf.config import stage_model_config
    from rlhf.loader import AdapterSpec, load_model, load_tokenizer
    from rlhf.templates import apply_template

    # finetuning_type lora with no adapter is the plain model, which the loader may also quantize
    cfg = stage_model_config(st.config, trust_remote_code=trust_remote_code, model_name_or_path=st.base,
                             gradient_checkpointing=False, finetuning_type="lora")
    if quantization != "stage":
        cfg.quantization = quantization
    if dtype:
        cfg.dtype = dtype
    adapters = [AdapterSpec("default", folder=st.adapter)] if st.adapter else []
    model = load_model(cfg, head=st.head, adapters=adapters, for_training=False)
    tokenizer = load_tokenizer(st.folder, cfg.trust_remote_code)
    apply_template(tokenizer, "auto" if tokenizer.chat_template else st.config.get("template", "auto"))
    return model, tokenizer


def release() -> None:
    """Give back the memory of a model the caller has deleted (the next one may need it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_reward_model(rm_dir: str, quantization: str = "none", trust_remote_code: bool = False,
                      base: str | None = None):
    """(model, tokenizer) of a finished RM folder, for scoring (`rlhf score`); unquantized unless asked."""
    from rlhf.manifest import check_parent

    m = check_parent(rm_dir, "rm", for_stage="rlhf score", base_model=base, base_option="--base")  # run `rlhf rm`
    return load_stage(_stage(rm_dir, m, base), quantization=quantization, trust_remote_code=trust_remote_code)
