"""The real-scale recipes (configs/qwen2.5-7b-qlora/, configs/llama3.1-8b-qlora/): every file loads through its
stage's config class with the settings its comments promise (the QLoRA paper's, or the reference variant's), and the
pipeline runs sft -> rm -> ppo for 2 steps each on a tiny model of the same architecture, each stage reading the
previous one's folder.

What the tiny run changes, and only that: the base (a 64-wide 2-layer model of the recipe's architecture, with grouped
kv heads as the real ones), the data (the bundled demo sets), the lengths and batches (small), max_steps 2 and the
output folders (tmp). Quantization stays as the recipe says (4-bit NF4, double quantization); on this CPU the
compute dtype is fp32 and bf16 autocast is off (bitsandbytes' CPU kernel, as tests/test_matrix.py), and the paged
optimizers (CUDA unified memory) become adamw_torch.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.stages import ppo, rm, sft

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"qwen2.5-7b-qlora": ("qwen2", "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "chatml"),
           "llama3.1-8b-qlora": ("llama", "8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3")}
CLASSES = {"sft": sft.SFTConfig, "sft_reference": sft.SFTConfig, "rm": rm.RMConfig, "ppo": ppo.PPOConfig}
CPU = dict(bf16=False, dtype="float32", bnb_4bit_compute_dtype="float32", optim="adamw_torch", logging_steps=1,
           save_steps=50, max_steps=2)
TINY = {
    "sft": dict(dataset=["demo_sft"], val_size=8, max_length=64, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, per_device_eval_batch_size=8),
    "rm": dict(dataset=["demo_pref"], val_size=8, max_length=64, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, per_device_eval_batch_size=8),
    "ppo": dict(dataset=["demo_prompts"], num_samples=None, val_size=4, eval_samples=4, max_prompt_length=64,
                max_new_tokens=8, batch_size=4, mini_batch_size=2, per_device_train_batch_size=2,
                per_device_eval_batch_size=4, critic_warmup_steps=1, sample_every=0),
}


def recipe_configs(recipe: str) -> dict:
    return {name: load_config(cls, str(ROOT / "configs" / recipe / f"{name}.yaml")) for name, cls in CLASSES.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_settings(recipe):
    """The QLoRA paper's settings in sft.yaml, the reference recipe in sft_reference.yaml, a warm-up that the schedule
    honours, and memory within one 24 GB GPU by the estimate (the figures in the files' comments)."""
    from rlhf.cli.estimate import stage_config
    from rlhf.data import load_registry
    from rlhf.estimate import GIB, setup_from_config, stage_estimate

    arch, named, hub_id, template = RECIPES[recipe]
    c = recipe_configs(recipe)
    s, ref = c["sft"], c["sft_reference"]
    assert s.model_name_or_path == ref.model_name_or_path == hub_id and s.template == ref.template == template
    for cfg in (s, ref):  # NF4 + double quantization, bf16 compute
        assert (cfg.quantization, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype,
                cfg.bf16) == ("4bit", "nf4", True, "bfloat16", True)
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, list(s.lora_target), s.learning_rate, s.max_grad_norm) == (
        64, 16, 0.1, ["all-linear"], 2e-4, 0.3)
    assert s.optim in ("paged_adamw_32bit", "paged_adamw_8bit")
    assert (ref.lora_r, ref.lora_alpha, ref.lora_dropout, list(ref.lora_target), ref.per_device_train_batch_size,
            ref.gradient_accumulation_steps, ref.learning_rate, ref.max_grad_norm, ref.num_train_epochs) == (
        8, 32, 0.1, ["q_proj", "v_proj"], 4, 4, 1e-4, 0.3, 1)
    assert ref.output_dir == s.output_dir  # rm.yaml and ppo.yaml follow either
    for name, cfg in c.items():  # a warm-up only where the schedule has one (transformers' constant drops it)
        assert cfg.lr_scheduler_type != "constant", name
        if cfg.warmup_ratio or cfg.warmup_steps:
            assert cfg.lr_scheduler_type in ("constant_with_warmup", "cosine", "linear"), name
    assert c["rm"].sft_dir == c["ppo"].sft_dir == s.output_dir and c["ppo"].rm_dir == c["rm"].output_dir
    registry = load_registry()
    for cfg in c.values():
        assert all(d in registry for d in cfg.dataset), cfg.dataset
    for name, stage in (("sft", "sft"), ("sft_reference", "sft"), ("rm", "rm"), ("ppo", "ppo")):
        cfg, shape = stage_config(stage, str(ROOT / "configs" / recipe / f"{name}.yaml"), named, {})
        setup, kw = setup_from_config(cfg, stage)
        peak = stage_estimate(stage, shape, setup, **kw).peak
        assert peak < 0.9 * 24 * GIB, (name, peak / GIB)
        text = (ROOT / "configs" / recipe / f"{name}.yaml").read_text()
        assert f"peak {peak / GIB:.1f} GiB" in text, name  # the comment's figure is the estimate's


def tiny_base(tmp_path, tiny_tokenizer_dir, arch: str) -> str:
    """A tiny model of ``arch`` with grouped kv heads; its tokenizer has llama3's turn tokens (single tokens, as in the
    real tokenizer) besides chatml's."""
    from transformers import AutoTokenizer

    from rlhf.tiny import make_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    return make_tiny_model(str(tmp_path / "base"), arch, tokenizer=tok, num_key_value_heads=2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_pipeline_runs_on_a_tiny_model(recipe, tmp_path, tiny_tokenizer_dir):
    from rlhf.cli.pipeline import stage_configs

    arch = RECIPES[recipe][0]
    base = tiny_base(tmp_path, tiny_tokenizer_dir, arch)
    plan = stage_configs(str(ROOT / "configs" / recipe / "pipeline.yaml"), output_root=str(tmp_path / "runs"))
    assert [stage for stage, _, _ in plan] == ["sft", "rm", "ppo"]
    run = {"sft": sft.run, "rm": rm.run, "ppo": ppo.run}
    folders = {}
    for stage, cfg, _ in plan:
        assert cfg.output_dir == str(tmp_path / "runs" / stage)
        over = {**CPU, **TINY[stage]}
        if stage == "sft":
            over["model_name_or_path"] = base
        else:
            assert cfg.sft_dir == folders["sft"] and (stage == "rm" or cfg.rm_dir == folders["rm"])
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if k in cfg.__dataclass_fields__})
        folders[stage] = run[stage](cfg)
        m = json.loads((Path(folders[stage]) / "manifest.json").read_text())
        assert m["config"]["quantization"] == "4bit", stage  # rm and ppo inherit the SFT folder's 4-bit base
        assert m["config"]["bnb_4bit_quant_type"] == "nf4" and m["config"]["bnb_4bit_use_double_quant"] is True
        if stage == "rm":
            assert (m["config"]["lora_r"], m["config"]["lora_target"]) == (64, ["all-linear"])
    for cfg_file in Path(folders["ppo"]).rglob("adapter_config.json"):  # the policy starts from the SFT adapter
        assert json.loads(cfg_file.read_text())["r"] == 64, cfg_file
    assert json.loads((Path(folders["ppo"]) / "manifest.json").read_text())["metrics"]["steps"] == 2
