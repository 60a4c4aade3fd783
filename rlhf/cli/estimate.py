"""`rlhf estimate`: the training memory of a stage (formulas and their published anchors: rlhf/estimate.py).

``rlhf estimate CONFIG.yaml`` reads the YAML a stage reads, into that stage's config class, and estimates what
the stage will build: the same keys, checked the same way, with the same defaults (rlhf/config.py and the stage
configs in stages/*.py), and ``quantization: auto`` / the adapter shape taken from the parent folder as rm and
ppo take them. ``rlhf estimate MODEL`` estimates a stage's default config on MODEL. Either way the options
(--batch-size, --seq-len, ...) override config keys.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import click

from rlhf.stages import STAGES

ESTIMATED = ("sft", "rm", "ppo")  # the stages the estimate models
# option -> config key (ppo: its own key where the stage has one)
KEYS = {"batch_size": "per_device_train_batch_size", "seq_len": "max_length", "lora_r": "lora_r",
        "lora_target": "lora_target", "lora_dropout": "lora_dropout", "attn": "attn_implementation"}
PPO_KEYS = {"seq_len": "max_prompt_length", "response_len": "max_new_tokens",
            "rollout_batch": "per_device_eval_batch_size",
            "value_model": "value_model"}


def config_stage(path: str, stage: str | None) -> str:
    """The stage whose config class accepts every key of the YAML file (the keys are what a stage checks; a file has
    no stage key). Several fit (a file of shared keys only): the one the file is named after, else --stage."""
    from rlhf.config import ConfigError, read_yaml

    if stage:
        return stage
    keys = {k.replace("-", "_") for k in read_yaml(path)}
    fit = [s for s in ESTIMATED if keys <= {f.name for f in fields(STAGES[s].config_class())}]
    stem = Path(path).stem
    if len(fit) == 1:
        return fit[0]
    if stem in (fit or ESTIMATED):  # none fit: the named stage's loading says which key is wrong
        return stem
    if not fit:
        return "sft"
    raise ConfigError(f"{path}: its keys fit the configs of {', '.join(fit)}; say which stage with --stage")


def parent_record(stage: str, path: str | None, cfg) -> dict | None:
    """What the stage reads from its first parent folder: the manifest's config and base model; before that stage
    has run, what it will record, from its config beside CONFIG (configs/demo/sft.yaml for configs/demo/rm.yaml)
    whose output_dir is the folder named. A planned `rlhf pt` base carries its config as "pt"."""
    from rlhf.config import inherit_quantization, load_config, to_dict
    from rlhf.manifest import MANIFEST, read_manifest

    for key, parent in STAGES[stage].parents[:1]:
        folder = "" if getattr(cfg, "from_base", False) else getattr(cfg, key)
        if not folder or Path(folder, MANIFEST).is_file():
            return read_manifest(folder) if folder else None
        sibling = Path(path).with_name(f"{parent}.yaml") if path else None
        if sibling is None or not sibling.is_file():
            return None
        pcfg = load_config(STAGES[parent].config_class(), sibling)
        if Path(pcfg.output_dir) != Path(folder):
            return None
        if parent == "pt":
            return {"config": to_dict(pcfg), "base_model": {"path": folder}, "pt": pcfg}
        grand = parent_record(parent, str(sibling), pcfg)
        inherit_quantization(pcfg, grand if parent != "sft" else None)  # sft: auto is none (stages/sft.py)
        base = pcfg.model_name_or_path or (grand or {}).get("base_model", {}).get("path")
        pt = (grand or {}).get("pt") if not Path(base or "").exists() else None
        return {"config": to_dict(pcfg), "base_model": {"path": base}, **({"pt": pt} if pt else {})}
    return None


def stage_config(stage: str, path: str | None, model: str | None, overrides: dict):
    """The stage's config (from ``path`` when given, else its defaults on ``model``), with what it takes from its
    parent folder, and the shape of the model it trains."""
    from rlhf.config import ConfigError, inherit_quantization, load_config
    from rlhf.estimate import load_shape, shape_from_config

    cls = STAGES[stage].config_class()
    cfg = load_config(cls, path, overrides) if path else cls(**overrides)
    parent = parent_record(stage, path, cfg)
    if STAGES[stage].parents[:1] and STAGES[stage].parents[0][0] == "sft_dir":  # rm, ppo: as they run
        inherit_quantization(cfg, parent, getattr(cfg, "sft_dir", ""))
        for k in ("lora_r", "lora_target"):  # their adapters start from the SFT folder's (stages/rm.py, stages/ppo.py)
            setattr(cfg, k, ((parent or {}).get("config") or {}).get(k, getattr(cfg, k)))
        base = cfg.model_name_or_path or (parent or {}).get("base_model", {}).get("path")
    else:
        inherit_quantization(cfg, None)
        base = cfg.model_name_or_path
    pt = (parent or {}).get("pt")
    if model is None and pt is not None and not Path(base or "").exists():  # a base `rlhf pt` will train
        from rlhf.tiny import tiny_config

        conf = tiny_config(pt.arch, vocab_size=pt.vocab_size, hidden_size=pt.hidden_size, num_layers=pt.num_layers,
                           num_heads=pt.num_heads, max_positions=pt.max_position_embeddings)
        return cfg, shape_from_config(conf.to_dict(), f"{base} (to be trained by rlhf pt, vocab_size {pt.vocab_size})")
    model = model or base
    if not model:
        raise ConfigError(f"{path}: no model_name_or_path, and no finished parent folder or parent config beside it "
                          "names the base; give the model with --model (a named size such as 7b, a folder or a hub id)")
    return cfg, load_shape(model)


def _describe(s) -> str:
    from rlhf.estimate import METHOD_HELP

    return (f"{METHOD_HELP[s.method]}, LoRA r={s.lora_r} on {','.join(s.lora_target)} (dropout {s.lora_dropout}), "
            f"micro-batch {s.batch_size} x {s.gradient_accumulation_steps}, {s.optim}, "
            f"gradient checkpointing {'yes' if s.gradient_checkpointing else 'no'}")


_DEFAULT = " [default: CONFIG's value, else the stage config's default]"


@click.command("estimate")
@click.argument("model_or_config", metavar="CONFIG.yaml|MODEL")
@click.option("--stage", type=click.Choice(ESTIMATED), default=None,
              help="Which stage's training step [default: the stage whose config takes CONFIG's keys; MODEL: sft].")
@click.option("--model", default=None, help="With CONFIG: estimate this model instead of its model_name_or_path.")
@click.option("--batch-size", type=int, default=None,
              help="Micro-batch (per_device_train_batch_size); RM counts 2 sequences per pair." + _DEFAULT)
@click.option("--seq-len", type=int, default=None,
              help="Tokens per sequence (max_length); PPO: max_prompt_length." + _DEFAULT)
@click.option("--lora-r", type=int, default=None, help="LoRA rank." + _DEFAULT)
@click.option("--lora-target", default=None, help="auto, all-linear or comma-separated module names." + _DEFAULT)
@click.option("--lora-dropout", type=float, default=None,
              help="LoRA dropout (a dropped copy of each adapted layer's input is stored)." + _DEFAULT)
@click.option("--attn", type=click.Choice(["sdpa", "eager"]), default=None,
              help="eager stores the attention scores (quadratic in length)." + _DEFAULT)
@click.option("--response-len", type=int, default=None,
              help="PPO: new tokens per response (max_new_tokens)." + _DEFAULT)
@click.option("--rollout-batch", type=int, default=None,
              help="PPO: sequences generated at once (per_device_eval_batch_size, at most batch_size)." + _DEFAULT)
@click.option("--value-model", type=click.Choice(["adapter", "shared"]), default=None, help="PPO critic." + _DEFAULT)
@click.option("--gpu-memory", default=None,
              help="Propose settings that fit this GPU: 24 (GiB, as sold), 24GiB, 80GB ...")
@click.option("--target-batch", default=16, show_default=True,
              help="With --gpu-memory: the batch to reach with micro-batch x accumulation.")
@click.option("--headroom", default=0.1, show_default=True,
              help="With --gpu-memory: share kept free (CUDA context, fragmentation).")
@click.option("--full", is_flag=True, help="With --gpu-memory: also consider full 16-bit fine-tuning.")
def estimate_cmd(model_or_config, stage, model, gpu_memory, target_batch, headroom, full, **options):
    """Training memory of a stage: for CONFIG.yaml (the file `rlhf sft|rm|ppo` reads) or for MODEL (a named size:
    7b 13b 30b 65b 70b (LLaMA-1/2), 8b (Llama-3.1), llama3-70b, qwen2.5-7b, qwen2.5-72b, mistral-7b; a model folder,
    a config.json or a hub id) with the stage's default config: weights, gradients, optimizer state and activations
    for full fine-tuning, LoRA and QLoRA, with and without gradient checkpointing; GiB.
    Formulas and their published anchors: rlhf/estimate.py."""
    from rlhf.estimate import (METHOD_HELP, _gib, estimate_ppo, lora_modules, lora_params, parse_size, propose,
                               setup_from_config, setup_to_config, stage_estimate, table)

    path = model_or_config if model_or_config.endswith((".yaml", ".yml")) else None
    stage = config_stage(path, stage) if path else stage or "sft"
    keys = {**KEYS, **(PPO_KEYS if stage == "ppo" else {})}
    overrides = {keys[k]: v for k, v in options.items() if v is not None and k in keys}
    if "lora_target" in overrides:
        overrides["lora_target"] = [t.strip() for t in overrides["lora_target"].split(",") if t.strip()]
    cfg, shape = stage_config(stage, path, model or (None if path else model_or_config), overrides)
    base, ppo = setup_from_config(cfg, stage)
    mods = lora_modules(shape, base.lora_target)
    click.echo(f"{shape.name}: {shape.params() / 1e9:.2f}B parameters ({shape.params():,}), {shape.layers} layers, "
               f"hidden {shape.hidden}, vocab {shape.vocab}; LoRA r={base.lora_r} on {','.join(m[0] for m in mods)}: "
               f"{lora_params(shape, base):,} parameters")
    seq = (f"prompt {base.seq_len} + response {ppo['response_len']} tokens" if stage == "ppo"
           else f"{base.seq_len} tokens")
    click.echo(f"stage {stage}, micro-batch {base.batch_size}, {seq}, GiB\n")
    if path:
        e = stage_estimate(stage, shape, base, **ppo)
        click.echo(f"{path}: {_describe(base)}\n  weights {_gib(e.weights)}, gradients {_gib(e.gradients)}, "
                   f"optimizer {_gib(e.optimizer)}, activations {_gib(e.activations)}: peak {_gib(e.peak)} GiB\n")
    click.echo(table(stage, shape, base, **ppo))
    if stage == "ppo":
        click.echo("\nPPO designs side by side (no checkpointing, AdamW), GiB:\n")
        rows = ["| method | one base + 4 adapters: weights | peak | four copies: weights | peak |",
                "|---|---:|---:|---:|---:|"]
        for method in ("full_16bit", "lora", "qlora_8bit", "qlora_4bit"):
            s = replace(base, method=method, gradient_checkpointing=False, optim="adamw_torch", act_bytes=None,
                        base_bytes=None)
            four = estimate_ppo(shape, s, **{**ppo, "design": "four_copies"})
            one = None if method.startswith("full") else estimate_ppo(shape, s, **{**ppo, "design": "one_base"})
            rows.append(f"| {METHOD_HELP[method]} | {_gib(one.weights) if one else '-'} | "
                        f"{_gib(one.peak) if one else '-'} | {_gib(four.weights)} | {_gib(four.peak)} |")
        click.echo("\n".join(rows))
    if gpu_memory is not None:
        gpu = parse_size(gpu_memory)
        s, e = propose(shape, gpu, stage, batch_size=target_batch, seq_len=base.seq_len, headroom=headroom, full=full,
                       base=base, **ppo)
        if s is None:
            raise click.ClickException(
                f"nothing fits in {_gib(gpu)} GiB with {headroom:.0%} headroom: the smallest setting needs "
                f"{_gib(e.peak)} GiB; shorten --seq-len, or use several GPUs (configs/accelerate) or a smaller model")
        click.echo(f"\nFits in {_gib(gpu)} GiB ({_gib(e.peak)} GiB estimated, {headroom:.0%} kept free) -- "
                   "config keys:")
        for k, v in setup_to_config(s, stage).items():
            v = str(v).lower() if isinstance(v, bool) else f"[{', '.join(v)}]" if isinstance(v, list) else v
            click.echo(f"  {k}: {v}")
