"""The one stage table: each stage's name, module, config class, one-line help and the parent folders it reads.

The CLI (a command per stage), the pipeline (run order, parent links) and the manifest checks (what to run
first) read it. It holds strings only: a stage module is imported when a command runs it (``StageSpec.load``),
so reading the table costs no torch import.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # the command: `rlhf <name>`, and the `stage` a manifest records
    module: str  # the recipe, with run(cfg) and the config class
    config: str  # its config dataclass
    help: str  # one line, for `rlhf --help`
    parents: tuple[tuple[str, str], ...] = ()  # (config key, parent stage): the key names that stage's folder

    @property
    def command(self) -> str:
        return f"rlhf {self.name}"

    def load(self):
        """The stage's module (imports torch and the training libraries)."""
        return importlib.import_module(self.module)

    def config_class(self):
        return getattr(self.load(), self.config)


# in run order (the pipeline runs them so)
STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("pt", "rlhf.stages.pt", "PTConfig", "Pre-train a small base model (and tokenizer) on a text corpus."),
    StageSpec("sft", "rlhf.stages.sft", "SFTConfig",
              "Supervised fine-tuning (LoRA/QLoRA, full or freeze) on instruction data.",
              parents=(("model_name_or_path", "pt"),)),
    StageSpec("rm", "rlhf.stages.rm", "RMConfig",
              "Train a reward model (score head) on preference pairs, from the SFT adapter.",
              parents=(("sft_dir", "sft"),)),
    StageSpec("ppo", "rlhf.stages.ppo", "PPOConfig",
              "PPO on one quantized base: policy, reference, reward and value as adapters.",
              parents=(("sft_dir", "sft"), ("rm_dir", "rm"))),
    StageSpec("dpo", "rlhf.stages.dpo", "DPOConfig",
              "DPO (and IPO, SimPO, ORPO, ...) on preference pairs from the SFT adapter; the reference is that "
              "adapter, frozen, on the same base.",
              parents=(("sft_dir", "sft"),)),
    StageSpec("grpo", "rlhf.stages.grpo", "GRPOConfig",
              "GRPO/RLOO on one quantized base: k samples per prompt, rewards from an RM adapter and/or Python "
              "functions.",
              parents=(("sft_dir", "sft"), ("rm_dir", "rm"))),
)}
