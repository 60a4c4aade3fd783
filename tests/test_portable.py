"""Stage folders that moved: the manifest records the base by its absolute path and fingerprint, and a moved base is
named with --base (chat/generate/eval/export/score) or model_name_or_path (rm/ppo), checked against the fingerprint."""
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from rlhf.cli import cli
from helpers import write_jsonl

ROWS = [{"instruction": f"Which is larger, {a} or {b}?", "output": str(max(a, b))}
        for a in range(10, 50, 7) for b in range(13, 50, 11) if a != b]


def one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    return lines[0]


@pytest.fixture(scope="module")
def moved(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny base, an SFT folder trained on it in one place, both moved (shutil.move) to another."""
    from rlhf.config import load_config
    from rlhf.stages import sft
    from rlhf.tiny import make_tiny_model

    here, there = tmp_path_factory.mktemp("made_here"), tmp_path_factory.mktemp("moved_there")
    base = make_tiny_model(str(here / "base"), "llama", tokenizer=tiny_tokenizer_dir)
    other = make_tiny_model(str(there / "other_base"), "llama", tokenizer=tiny_tokenizer_dir, seed=1)
    write_jsonl(here / "sft.jsonl", ROWS)
    write_jsonl(here / "pref.jsonl", [{"instruction": r["instruction"], "chosen": r["output"], "rejected": "0"}
                                      for r in ROWS])
    sft_dir = sft.run(load_config(sft.SFTConfig, None, dict(
        model_name_or_path=base, dataset=str(here / "sft.jsonl"), output_dir=str(here / "sft"), max_length=48,
        max_steps=2, per_device_train_batch_size=4, save_steps=100, logging_steps=1, task_eval_samples=0)))
    recorded = json.loads((here / "sft" / "manifest.json").read_text())["base_model"]
    shutil.move(base, there / "base")
    shutil.move(sft_dir, there / "sft")
    shutil.move(str(here / "pref.jsonl"), there / "pref.jsonl")
    write_jsonl(there / "prompts.jsonl", [{"instruction": "Which is larger, 3 or 9?"}])
    return {"here": here, "there": there, "base": str(there / "base"), "sft": str(there / "sft"), "other": other,
            "recorded": recorded, "old_base": base}


def test_manifest_records_the_base_by_absolute_path(moved):
    assert moved["recorded"]["path"] == str(moved["here"].resolve() / "base")
    assert not moved["recorded"]["fingerprint"].startswith("hub:")


def test_generate_from_a_moved_folder_with_base(moved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another directory than the one that made the folders
    args = ["generate", moved["sft"], "--input", str(moved["there"] / "prompts.jsonl"), "--max-new-tokens", "4"]
    r = CliRunner().invoke(cli, args + ["--output", "out.jsonl"])
    line = one_line_error(r)
    assert moved["old_base"] in line and "not there" in line and "--base" in line
    r = CliRunner().invoke(cli, args + ["--output", "out.jsonl", "--base", moved["base"]])
    assert r.exit_code == 0, r.output
    assert "response" in json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    r = CliRunner().invoke(cli, args + ["--output", "out2.jsonl", "--base", moved["other"]])
    line = one_line_error(r)
    assert moved["other"] in line and "--base" in line and "not" in line


def test_rm_from_a_moved_sft_with_model_name_or_path(moved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dict(sft_dir=moved["sft"], dataset=[str(moved["there"] / "pref.jsonl")], output_dir=str(tmp_path / "rm"),
               max_length=48, max_steps=2, per_device_train_batch_size=4, save_steps=100, logging_steps=1)
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    line = one_line_error(CliRunner().invoke(cli, ["rm", "rm.yaml"]))
    assert "not there" in line and "--model-name-or-path" in line
    line = one_line_error(CliRunner().invoke(cli, ["rm", "rm.yaml", "--model-name-or-path", moved["other"]]))
    assert moved["other"] in line and "fingerprint" in line
    r = CliRunner().invoke(cli, ["rm", "rm.yaml", "--model-name-or-path", moved["base"]])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert m["base_model"] == {"path": moved["base"], "fingerprint": moved["recorded"]["fingerprint"]}


def test_an_older_manifest_with_a_relative_base_reads_it_from_the_current_directory(moved, tmp_path, monkeypatch):
    import os

    sft = tmp_path / "sft"
    shutil.copytree(moved["sft"], sft)
    m = json.loads((sft / "manifest.json").read_text())
    m["base_model"]["path"] = os.path.relpath(moved["base"], tmp_path)  # as rlhf wrote it before
    (sft / "manifest.json").write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["generate", "sft", "--input", str(moved["there"] / "prompts.jsonl"),
                                 "--output", "out.jsonl", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
