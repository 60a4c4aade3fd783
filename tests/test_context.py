"""Defaults that fit the model: on a model of 64 positions, `rlhf chat` (default reply 256 tokens) and `rlhf generate`
(the stage's max_new_tokens and max_length) run with default settings; values given that cannot fit are one line."""
import json

import pytest
from click.testing import CliRunner

from rlhf.cli import cli
from helpers import write_jsonl


@pytest.fixture(scope="module")
def short_sft(tiny_tokenizer_dir, tmp_path_factory):
    from rlhf.config import load_config
    from rlhf.stages import sft
    from rlhf.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("short_context")
    base = make_tiny_model(str(tmp / "base"), "llama", tokenizer=tiny_tokenizer_dir, max_positions=64)
    assert json.loads((tmp / "base" / "config.json").read_text())["max_position_embeddings"] == 64
    write_jsonl(tmp / "sft.jsonl", [{"instruction": f"Add {a} and {a}.", "output": str(2 * a)} for a in range(12)])
    out = sft.run(load_config(sft.SFTConfig, None, dict(
        model_name_or_path=base, dataset=str(tmp / "sft.jsonl"), output_dir=str(tmp / "sft"), max_length=48,
        max_steps=1, per_device_train_batch_size=4, save_steps=100, logging_steps=1, task_eval_samples=0)))
    write_jsonl(tmp / "prompts.jsonl", [{"instruction": "Add 3 and 3."}, {"instruction": "Add 4 and 4, please."}])
    return {"sft": out, "prompts": str(tmp / "prompts.jsonl"), "tmp": tmp}


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output  # a setting that cannot be: the config error's exit status
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    return lines[0]


def test_generate_with_defaults_fits_a_64_token_model(short_sft, tmp_path):
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(cli, ["generate", short_sft["sft"], "--input", short_sft["prompts"], "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert [set(json.loads(line)) >= {"response"} for line in out.read_text().splitlines()] == [True, True]
    r = CliRunner().invoke(cli, ["generate", short_sft["sft"], "--input", short_sft["prompts"], "--output", str(out),
                                 "--max-new-tokens", "64"])
    assert "--max-new-tokens 64 leaves no room for a prompt in the model's context of 64" in one_line_error(r)
    r = CliRunner().invoke(cli, ["generate", short_sft["sft"], "--input", short_sft["prompts"], "--output", str(out),
                                 "--max-length", "40", "--max-new-tokens", "30"])
    assert "exceed the model's context of 64 tokens" in one_line_error(r)


def test_chat_with_defaults_fits_a_64_token_model(short_sft):
    long = "And now add five and five, then tell me why, in words, with the working shown step by step."
    turns = f"Add 3 and 3.\nAdd 4 and 4.\n{long}\nAdd 5 and 5.\n/exit\n"
    r = CliRunner().invoke(cli, ["chat", short_sft["sft"], "--temperature", "0"], input=turns)
    assert r.exit_code == 0, r.output  # a reply of 32 tokens (half the context), the history in the other 32
    assert r.output.count("bot> ") == 3 and "Error" not in r.output
    assert "(that message alone is longer than the 32 tokens a prompt may take" in r.output
    r = CliRunner().invoke(cli, ["chat", short_sft["sft"], "--max-new-tokens", "80"], input="hi\n")
    assert "--max-new-tokens 80 leaves no room" in one_line_error(r)
    r = CliRunner().invoke(cli, ["chat", short_sft["sft"], "--max-length", "100"], input="hi\n")
    assert "--max-length 100 exceeds the model's context of 64" in one_line_error(r)
