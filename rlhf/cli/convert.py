"""`rlhf convert`: a GGUF file -> a transformers model folder that every stage takes as model_name_or_path
(rlhf/gguf.py says why a one-time conversion rather than reading the GGUF at each stage)."""
from __future__ import annotations

import click

from rlhf.gguf import DTYPES


@click.command("convert")
@click.argument("gguf_file", type=click.Path(dir_okay=True))
@click.option("--out", required=True, type=click.Path(), help="Folder to write the transformers model to.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES),
              help="Dtype of the saved weights (float32 keeps the dequantized values exactly).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def convert_cmd(gguf_file, out, dtype, overwrite):
    """Convert GGUF_FILE (llama.cpp) to a transformers model folder: dequantized weights, tokenizer, chat template.

    Needs the `gguf` package (pip install 'rlhf[gguf]'). Example:

        rlhf convert SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
        rlhf sft configs/smollm2-135m/sft.yaml --model-name-or-path models/smollm2-135m
    """
    from rlhf.gguf import convert_gguf
    from rlhf.logging_utils import setup_logging

    setup_logging()
    click.echo(f"done: {convert_gguf(gguf_file, out, dtype=dtype, overwrite=overwrite)}")
