"""`rlhf export`: a stage folder -> a plain transformers model folder, the adapter merged into the base.

The merge happens on an unquantized base (a QLoRA stage's 4/8-bit base is reloaded in the export dtype), so
the export loads with ``AutoModelForCausalLM.from_pretrained`` (``AutoModelForSequenceClassification`` for a
reward model, score head kept) and no peft. The folder holds sharded safetensors, the tokenizer with its
chat template, and a generation config that stops on the template's end-of-turn token. A PPO folder exports
its policy (the critic under ``value/`` is a training aid and is left out).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from rlhf.cli.use import base_option, setup_logging, trust_remote_code_option
from rlhf.errors import RlhfError
from rlhf.stage_folder import POLICIES, SCORERS, load_stage, open_stage

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}
PROBE = "Which is larger, 37 or 52?"


class ExportError(RlhfError, RuntimeError):
    """An export target that cannot be written."""


def _check_target(folder: Path, out: Path, overwrite: bool) -> None:
    src, dst = folder.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ExportError(f"--out {out} would replace the stage folder {folder} it exports; choose another folder")
    if src in dst.parents:
        raise ExportError(f"--out {out} lies inside the stage folder {folder}; choose a folder outside it")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def _probe_logits(model, tokenizer):
    import torch

    from rlhf.templates import encode_prompt

    ids = encode_prompt(tokenizer, [{"role": "user", "content": PROBE}], 10_000)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float().cpu()


def export_stage(folder: str, out: str, *, dtype: str = "bfloat16", max_shard_size: str = "2GB",
                 overwrite: bool = False, trust_remote_code: bool = False, base: str | None = None,
                 say=click.echo) -> dict:
    """Merge the folder's adapter into its base and save a plain transformers model to ``out``; returns a summary."""
    from rlhf.templates import stop_token_ids

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not known; use bfloat16, float16 or float32")
    dtype = DTYPES[dtype]
    st = open_stage(folder, POLICIES + SCORERS, "rlhf export", base)
    out_p = Path(out)
    _check_target(Path(folder), out_p, overwrite)
    if st.quantization != "none" and st.adapter:
        say(f"{folder} trained on a {st.quantization} base; reloading the base unquantized ({dtype}) for the merge")
    model, tokenizer = load_stage(st, quantization="none", dtype=dtype, trust_remote_code=trust_remote_code)
    before = _probe_logits(model, tokenizer)
    if st.adapter:
        model = model.merge_and_unload()
    diff = (_probe_logits(model, tokenizer) - before).abs().max().item()

    if st.head == "lm":
        stops = stop_token_ids(tokenizer)
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    else:
        model.config.pad_token_id = tokenizer.pad_token_id
    work = Path(str(out_p) + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(work), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(work))
    summary = {"source": str(Path(folder).resolve()), "stage": st.stage, "base_model": st.manifest["base_model"],
               "merged_adapter": bool(st.adapter), "trained_quantization": st.quantization, "dtype": dtype,
               "head": "sequence classification (score)" if st.head == "score" else "causal LM",
               "merge_max_abs_logit_diff": diff}
    (work / "rlhf_export.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out_p.exists():  # --overwrite, checked above
        shutil.rmtree(out_p)
    os.replace(work, out_p)
    return summary


@click.command("export")
@click.argument("folder")
@click.option("--out", required=True, help="Folder to write the merged model to.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True,
              help="Weights dtype of the export.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard (e.g. 500MB, 5GB).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@trust_remote_code_option
@base_option
def export_cmd(folder, out, dtype, max_shard_size, overwrite, trust_remote_code, base):
    """Merge a stage folder's adapter into its base and save a plain transformers model.

    SFT/PPO -> AutoModelForCausalLM, RM -> AutoModelForSequenceClassification (score head kept); sharded
    safetensors, tokenizer with the chat template. A 4/8-bit base is reloaded unquantized for the merge.
    """
    setup_logging()
    s = export_stage(folder, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     trust_remote_code=trust_remote_code, base=base)
    cls = "AutoModelForSequenceClassification" if s["head"].startswith("sequence") else "AutoModelForCausalLM"
    click.echo(f"exported {s['stage']} folder {folder} -> {out} ({s['dtype']}; "
               f"{'adapter merged, ' if s['merged_adapter'] else ''}max |logit change| on a probe "
               f"{s['merge_max_abs_logit_diff']:.2g}); load it with {cls}.from_pretrained(\"{out}\")")
