"""`rlhf pt`: a few steps on a slice of the demo corpus; the folder loads with plain transformers."""
import json
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, load_config
from rlhf.datasets_registry import make_demo_data as mdd
from rlhf.stages.pt import PTConfig, end_texts_with_end_of_turn, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "block_size": 32, "max_steps": 25,
        "per_device_train_batch_size": 8, "logging_steps": 5, "learning_rate": 5e-3, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    lines = (mdd.DATA_DIR / "demo_corpus.jsonl").read_text().splitlines()[:400]
    p = tmp_path_factory.mktemp("corpus") / "slice.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def pretrain(tmp_path, corpus, **kw) -> Path:
    out = tmp_path / "pt"
    cfg = load_config(PTConfig, str(ROOT / "configs/demo/pt.yaml"),
                      {**TINY, "dataset": corpus, "output_dir": str(out), **kw})
    assert run(cfg) == str(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pt_loss_falls_and_the_folder_loads_with_plain_transformers(tmp_path, corpus, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pretrain(tmp_path, corpus, arch=arch)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pt" and manifest["config"]["arch"] == arch
    m = manifest["metrics"]
    assert m["train_loss_last"] < 0.8 * m["train_loss_first"], m
    assert (out / "model.safetensors").is_file() and (out / "training_curves.png").is_file()

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert tok.tokenize(" 37") == ["Ġ", "3", "7"]  # split_digits
    prompt = tok.apply_chat_template([{"role": "user", "content": "What comes after 37?"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|>user\nWhat comes after 37?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_end_of_turn_takes_the_end_of_text_row(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pretrain(tmp_path, corpus, max_steps=2)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    head = model.get_output_embeddings().weight
    before = head[[eos, eot]].clone()
    end_texts_with_end_of_turn(model, tok)
    assert torch.equal(head[eot], before[0]) and torch.equal(head[eos], before[1])


def test_pt_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        load_config(PTConfig, None, {"hidden_size": "30", "num_heads": "4"})
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(PTConfig, None, {"arch": "t5"})
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        load_config(PTConfig, None, {"hiden_size": "64"})
