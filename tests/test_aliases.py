"""Other tools' key names (rlhf/aliases.py): each alias maps to our key, an alias and its key that disagree are an
error, refused keys say what to do, unknown keys still fail with a sensible hint, and LLaMA-Factory-style SFT and
RM YAML files run through the real CLI."""
import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rlhf.cli import cli
from rlhf.config import ConfigError, load_config
from rlhf.stages.ppo import PPOConfig
from rlhf.stages.rm import RMConfig
from rlhf.stages.sft import SFTConfig

SFT = {"dataset": "demo_sft"}
RM = {"dataset": "demo_pref", "sft_dir": "runs/x"}

MAPS = [  # (config class, their key, their value, our key, our value)
    (SFTConfig, "load_in_4bit", True, "quantization", "4bit"),
    (SFTConfig, "load_in_8bit", True, "quantization", "8bit"),
    (SFTConfig, "quantization_bit", 4, "quantization", "4bit"),
    (SFTConfig, "quantization_bit", "8", "quantization", "8bit"),  # from the command line
    (SFTConfig, "quantization_type", "fp4", "bnb_4bit_quant_type", "fp4"),
    (SFTConfig, "double_quantization", False, "bnb_4bit_use_double_quant", False),
    (SFTConfig, "use_bnb_nested_quant", False, "bnb_4bit_use_double_quant", False),
    (SFTConfig, "torch_dtype", "bfloat16", "dtype", "bfloat16"),
    (SFTConfig, "flash_attn", "fa2", "attn_implementation", "flash_attention_2"),
    (SFTConfig, "flash_attn", "sdpa", "attn_implementation", "sdpa"),
    (SFTConfig, "flash_attn", "disabled", "attn_implementation", "eager"),
    (SFTConfig, "flash_attn", "auto", "attn_implementation", None),
    (SFTConfig, "lora_rank", 32, "lora_r", 32),
    (SFTConfig, "lora_target", "all", "lora_target", ["all-linear"]),
    (SFTConfig, "lora_target", "q_proj,v_proj", "lora_target", ["q_proj", "v_proj"]),
    (SFTConfig, "lora_target_modules", "all-linear", "lora_target", ["all-linear"]),
    (SFTConfig, "use_peft", False, "finetuning_type", "full"),
    (SFTConfig, "disable_gradient_checkpointing", False, "gradient_checkpointing", True),
    (SFTConfig, "cutoff_len", 256, "max_length", 256),
    (SFTConfig, "max_seq_length", 256, "max_length", 256),
    (SFTConfig, "max_samples", 100, "num_samples", 100),
    (SFTConfig, "dataset_dir", "data", "registry_file", "data/dataset_info.json"),
    (SFTConfig, "template", "qwen", "template", "qwen2.5"),
    (SFTConfig, "template", "llama3", "template", "llama3"),
    (SFTConfig, "template", "default", "template", "auto"),
    (SFTConfig, "assistant_only_loss", False, "train_on_prompt", True),
    (SFTConfig, "warmup_steps", 5, "warmup_steps", 5),
    (SFTConfig, "resume_from_checkpoint", True, "resume", True),
    (SFTConfig, "stage", "sft", "quantization", "auto"),
    (SFTConfig, "do_train", True, "quantization", "auto"),
    (SFTConfig, "plot_loss", True, "quantization", "auto"),
    (SFTConfig, "ddp_timeout", 180000000, "quantization", "auto"),
    (SFTConfig, "preprocessing_num_workers", 16, "quantization", "auto"),
    (RMConfig, "adapter_name_or_path", "runs/sft", "sft_dir", "runs/sft"),
    (PPOConfig, "reward_model", "runs/rm", "rm_dir", "runs/rm"),
    (PPOConfig, "num_ppo_epochs", 2, "ppo_epochs", 2),
    (PPOConfig, "response_length", 16, "max_new_tokens", 16),
    (PPOConfig, "ppo_target", 3.0, "kl_target", 3.0),
    (PPOConfig, "init_kl_coef", 0.2, "kl_coef", 0.2),
    (PPOConfig, "adap_kl_ctrl", True, "adaptive_kl", True),
    (PPOConfig, "ppo_score_norm", True, "score_norm", "normalize"),
    # axolotl
    (SFTConfig, "base_model", "some/model", "model_name_or_path", "some/model"),
    (SFTConfig, "sequence_len", 512, "max_length", 512),
    (SFTConfig, "micro_batch_size", 2, "per_device_train_batch_size", 2),
    (SFTConfig, "num_epochs", 3, "num_train_epochs", 3),
    (SFTConfig, "val_set_size", 0.05, "val_size", 0.05),
    (SFTConfig, "optimizer", "paged_adamw_8bit", "optim", "paged_adamw_8bit"),
    (SFTConfig, "lr_scheduler", "cosine", "lr_scheduler_type", "cosine"),
    (SFTConfig, "adapter", "qlora", "finetuning_type", "lora"),
    (SFTConfig, "lora_target_linear", True, "lora_target", ["all-linear"]),
    (SFTConfig, "chat_template", "qwen_25", "template", "qwen2.5"),
    (SFTConfig, "flash_attention", True, "attn_implementation", "flash_attention_2"),
]


def base_of(cls):
    return {SFTConfig: SFT, RMConfig: RM, PPOConfig: {**RM, "dataset": "demo_prompts", "rm_dir": "runs/r"}}[cls]


@pytest.mark.parametrize("cls,theirs,value,ours,expected", MAPS,
                         ids=[f"{m[1]}={m[2]}" for m in MAPS])
def test_each_alias_maps(cls, theirs, value, ours, expected):
    base = {k: v for k, v in base_of(cls).items() if k != ours}
    cfg = load_config(cls, None, {**base, theirs: value})
    assert getattr(cfg, ours) == expected


def test_alias_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="rlhf"):
        load_config(SFTConfig, None, {**SFT, "load_in_4bit": True, "plot_loss": True})
    lines = [r.getMessage() for r in caplog.records]
    assert "command line: load_in_4bit: true -> quantization: 4bit" in lines, lines
    assert any(x.startswith("command line: plot_loss: true (LLaMA-Factory) ignored") for x in lines), lines


@pytest.mark.parametrize("values,msg", [
    ({"lora_r": 8, "lora_rank": 16}, r"'lora_r: 8' and 'lora_rank: 16' set 'lora_r' differently"),
    ({"quantization": "8bit", "load_in_4bit": True}, r"set 'quantization' differently"),
    ({"load_in_8bit": True, "quantization_bit": 4}, r"'load_in_8bit: true' and 'quantization_bit: 4'"),
    ({"max_length": 64, "cutoff_len": 128}, r"set 'max_length' differently"),
])
def test_alias_and_target_disagree(values, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(SFTConfig, None, {**SFT, **values})


def test_alias_and_target_agree_or_command_line_wins(tmp_path):
    assert load_config(SFTConfig, None, {**SFT, "lora_r": 16, "lora_rank": "16"}).lora_r == 16
    f = tmp_path / "c.yaml"
    f.write_text("dataset: demo_sft\nlora_rank: 4\nquantization_bit: 4\n")
    cfg = load_config(SFTConfig, str(f), {"lora_r": "16", "quantization": "none"})
    assert (cfg.lora_r, cfg.quantization) == (16, "none")


@pytest.mark.parametrize("cls,values,msg", [
    (SFTConfig, {"stage": "rm"}, r"stage: rm \(LLaMA-Factory\) is not this command's \(`rlhf sft`\); run `rlhf rm"),
    (SFTConfig, {"stage": "kto"}, r"rlhf has no such stage"),
    (SFTConfig, {"stage": "dpo"}, r"stage: dpo \(LLaMA-Factory\) is not this command's \(`rlhf sft`\); run `rlhf dpo"),
    (SFTConfig, {"deepspeed": "ds_z3.json"}, r"'deepspeed' .*accelerate launch --config_file "
                                              r"configs/accelerate/deepspeed_zero2.yaml"),
    (SFTConfig, {"quantization_bit": 3}, r"'quantization_bit' \(LLaMA-Factory\) got 3: use one of 4, 8"),
    (SFTConfig, {"quantization_method": "gptq"}, r"bitsandbytes only"),
    (SFTConfig, {"flash_attn": "fa3"}, r"'flash_attn'.*use one of fa2, sdpa, disabled, auto"),
    (SFTConfig, {"do_train": False}, r"always train"),
    (SFTConfig, {"use_unsloth": True}, r"'use_unsloth' \(LLaMA-Factory\) is not honoured"),
    (SFTConfig, {"adapter_name_or_path": "x"}, r"means rlhf's 'sft_dir', which `rlhf sft` does not take"),
    (PPOConfig, {"ref_model": "x"}, r"KL reference is the SFT adapter"),
    (SFTConfig, {"resume_from_checkpoint": "out/checkpoint-5"}, r"give resume: true"),
    (SFTConfig, {"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}, r"'datasets' \(axolotl\).*`dataset:`"),
    (SFTConfig, {"adapter": "ia3"}, r"'adapter' \(axolotl\)"),
    (SFTConfig, {"rl": "dpo"}, r"'rl' \(axolotl\).*`rlhf ppo`"),
])
def test_refused_keys_say_what_to_do(cls, values, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(cls, None, {**base_of(cls), **values})


def test_unknown_keys_still_error_without_nonsense():
    with pytest.raises(ConfigError, match=r"unknown key 'load_in_4bits'; did you mean 'load_in_4bit'\?"):
        load_config(SFTConfig, None, {**SFT, "load_in_4bits": True})
    with pytest.raises(ConfigError, match=r"unknown key 'warmup_stepz'; did you mean 'warmup_steps'\?"):
        load_config(SFTConfig, None, {**SFT, "warmup_stepz": 3})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, {**SFT, "frobnicate_everything": 1})
    assert "did you mean" not in str(e.value) and "valid keys: " in str(e.value)
    with pytest.raises(ConfigError, match=r"'reward_model' \(LLaMA-Factory\) means rlhf's 'rm_dir', which `rlhf sft` "
                                          r"does not take"):
        load_config(SFTConfig, None, {**SFT, "reward_model": "x"})


def test_warmup_steps_reaches_training_arguments(tmp_path):
    from rlhf.train_utils import trainer_kwargs

    cfg = load_config(SFTConfig, None, {**SFT, "warmup_steps": 7, "warmup_ratio": 0.1})
    assert trainer_kwargs(cfg, tmp_path, False)["warmup_steps"] == 7
    cfg = load_config(SFTConfig, None, {**SFT, "warmup_ratio": 0.1})
    assert trainer_kwargs(cfg, tmp_path, False)["warmup_steps"] == 0.1


def lf_yaml(path: Path, stage: str, base: str, out: Path, **extra) -> str:
    """A LLaMA-Factory-style file of its common keys (examples/train_qlora/*.yaml shape)."""
    doc = {"model_name_or_path": base, "quantization_bit": 4, "stage": stage, "do_train": True,
           "finetuning_type": "lora", "lora_target": "all", "lora_rank": 4, "template": "chatml", "cutoff_len": 64,
           "max_samples": 16, "overwrite_cache": True, "preprocessing_num_workers": 4, "output_dir": str(out),
           "logging_steps": 1, "save_steps": 500, "plot_loss": True, "overwrite_output_dir": True,
           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4,
           "max_steps": 2, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": False,
           "ddp_timeout": 180000000, **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_llama_factory_sft_rm_ppo_yaml_run_through_the_cli(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    sft_out, rm_out = tmp_path / "sft", tmp_path / "rm"
    sft_yaml = lf_yaml(tmp_path / "llama3_lora_sft.yaml", "sft", base, sft_out, dataset="demo_sft")
    # task_eval_samples is rlhf's own (the held-out generation check): off to keep the test short
    r = CliRunner().invoke(cli, ["sft", sft_yaml, "--task_eval_samples", "0"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((sft_out / "manifest.json").read_text())
    c = manifest["config"]
    assert (c["quantization"], c["lora_target"], c["lora_r"], c["max_length"], c["num_samples"]) == \
        ("4bit", ["all-linear"], 4, 64, 16)
    rm_yaml = lf_yaml(tmp_path / "llama3_lora_reward.yaml", "rm", base, rm_out, dataset="demo_pref",
                      adapter_name_or_path=str(sft_out))
    r = CliRunner().invoke(cli, ["rm", rm_yaml])
    assert r.exit_code == 0, r.output
    c = json.loads((rm_out / "manifest.json").read_text())["config"]
    assert (c["sft_dir"], c["quantization"]) == (str(sft_out), "4bit")
    r = CliRunner().invoke(cli, ["sft", rm_yaml])  # the RM file under the SFT command: one line, no model loaded
    assert r.exit_code == 2 and "stage: rm (LLaMA-Factory) is not this command's (`rlhf sft`)" in r.output
    ppo_yaml = lf_yaml(tmp_path / "llama3_lora_ppo.yaml", "ppo", base, tmp_path / "ppo", dataset="demo_prompts",
                       adapter_name_or_path=str(sft_out), reward_model=str(rm_out), max_new_tokens=8, max_steps=1)
    r = CliRunner().invoke(cli, ["ppo", ppo_yaml])
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "ppo" / "manifest.json").read_text())
    assert (c["config"]["rm_dir"], c["config"]["quantization"], c["metrics"]["steps"]) == (str(rm_out), "4bit", 1)


def test_llama_factory_ppo_yaml_loads(tmp_path):
    """LLaMA-Factory's examples/train_lora/llama3_lora_ppo.yaml shape, with the SFT folder as adapter_name_or_path."""
    f = lf_yaml(tmp_path / "llama3_lora_ppo.yaml", "ppo", "base", tmp_path / "ppo", dataset="demo_prompts",
                adapter_name_or_path="runs/sft", reward_model="runs/rm", max_new_tokens=16, top_k=0, top_p=0.9)
    cfg = load_config(PPOConfig, f)
    assert (cfg.sft_dir, cfg.rm_dir, cfg.lora_target, cfg.max_length, cfg.top_p) == \
        ("runs/sft", "runs/rm", ["all-linear"], 64, 0.9)
