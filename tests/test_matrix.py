"""The matrix users meet: sft -> rm -> ppo, each stage reading the previous one's folder, on tiny models of six
architectures x three quantizations x three tokenizer setups, and the score token (rlhf.scoring) checked on each.

Tokenizer setups: ``own_pad`` (a pad token of its own), ``pad_eos`` (no pad, so pad = eos = the end-of-turn token,
as SmolLM2 / Llama-3-instruct with pad = eos), ``eot`` (end-of-turn ``<|im_end|>`` distinct from eos
``<|endoftext|>``, which is also pad: llama-3's ``<|eot_id|>`` vs ``<|end_of_text|>``).

Cut, to stay inside the suite's time: not the full 6 x 3 x 3 = 54 chains but 18, every architecture at every
quantization, with the tokenizer setup rotated so that each architecture meets all three setups and each
quantization all three (pairwise coverage); each stage runs 2 steps (PPO: 1) on a 64-wide 2-layer model.
"""
import json
from pathlib import Path

import pytest
import torch

from helpers import write_jsonl
from rlhf.config import load_config
from rlhf.stages import ppo, rm, sft
from rlhf.generation import response_mask
from rlhf.tiny import ARCHS

QUANTS = ("none", "4bit", "8bit")
TOKENIZERS = ("own_pad", "pad_eos", "eot")
CASES = [(arch, q, TOKENIZERS[(i + j) % 3]) for i, arch in enumerate(ARCHS) for j, q in enumerate(QUANTS)]


def make_tokenizer(tiny_tokenizer_dir: str, setup: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    if setup == "own_pad":
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    elif setup == "pad_eos":
        tok.eos_token = "<|im_end|>"
        tok.pad_token = None
    assert setup in TOKENIZERS
    return tok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix_data")
    sft_rows = [{"instruction": f"Repeat {i}", "output": f"{i} {i}"} for i in range(16)]
    pairs = [{"instruction": f"Which is larger, {a} or {a + 7}?", "chosen": str(a + 7),
              "rejected": str(a)} for a in range(16)]
    prompts = [{"instruction": "Count" + " up" * (i % 4) + f" from {i}"} for i in range(8)]  # several prompt lengths
    data = (("sft", sft_rows), ("pref", pairs), ("prompts", prompts))
    return {k: write_jsonl(tmp / f"{k}.jsonl", rows) for k, rows in data}


def plain_rm_scores(base: str, rm_dir: str, rows: list[list[int]], quantization: str) -> list[float]:
    """Score each row of ids alone (batch 1, no padding) with the RM folder loaded the README's way."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(rm_dir)
    q = {"4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=torch.float32),
         "8bit": dict(load_in_8bit=True)}.get(quantization)
    kw = {"quantization_config": BitsAndBytesConfig(**q)} if q else {}
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id,
                                                               dtype=torch.float32, **kw)
    if quantization == "4bit":  # the same fp32 4-bit kernel as rlhf's loader (not bitsandbytes' AVX512-BF16 repack)
        from rlhf.loader import _fix_4bit_cpu_trap

        _fix_4bit_cpu_trap(model)
    model = PeftModel.from_pretrained(model, rm_dir).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]


def strip_pad(ids: torch.Tensor, attn: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded PPO row: attention 1 (prompt, response up to and with its stop token)."""
    return [row[a.bool()].tolist() for row, a in zip(ids, attn)]


@pytest.mark.parametrize("arch,quantization,setup", CASES, ids=[f"{a}-{q}-{t}" for a, q, t in CASES])
def test_chain(arch, quantization, setup, tiny_tokenizer_dir, data, tmp_path):
    from rlhf.loader import inherit_quantization, load_tokenizer
    from rlhf.templates import encode_prompt, stop_token_ids
    from rlhf.tiny import make_tiny_model

    base = make_tiny_model(str(tmp_path / "base"), arch, tokenizer=make_tokenizer(tiny_tokenizer_dir, setup))
    common = dict(max_steps=2, max_length=48, logging_steps=1, save_steps=50, per_device_train_batch_size=4,
                  learning_rate=1e-3, template="chatml", lora_target="all-linear")
    sft_dir = sft.run(load_config(sft.SFTConfig, None, dict(
        common, model_name_or_path=base, dataset=[data["sft"]], output_dir=str(tmp_path / "sft"), task_eval_samples=0,
        quantization=quantization)))
    # rm and ppo are not told the quantization: they take the SFT folder's
    rm_dir = rm.run(load_config(rm.RMConfig, None,
                                dict(common, sft_dir=sft_dir, dataset=[data["pref"]], output_dir=str(tmp_path / "rm"))))
    for folder in (sft_dir, rm_dir):
        m = json.loads((Path(folder) / "manifest.json").read_text())
        assert m["config"]["quantization"] == quantization
        rows = map(json.loads, (Path(folder) / "train_log.jsonl").read_text().splitlines())
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)

    # The score token: PPO's reward of a rollout equals the plain-loaded RM folder's score of the same ids.
    cfg = load_config(ppo.PPOConfig, None, dict(sft_dir=sft_dir, rm_dir=rm_dir, output_dir=str(tmp_path / "ppo"),
                                                dataset=[data["prompts"]], batch_size=4, mini_batch_size=2,
                                                per_device_train_batch_size=2, ppo_epochs=1, max_steps=1,
                                                max_new_tokens=4, eval_samples=0, sample_every=0, seed=1))
    cfg.model_name_or_path = base
    inherit_quantization(cfg, json.loads((Path(sft_dir) / "manifest.json").read_text()), sft_dir)
    tok = load_tokenizer(sft_dir)
    roles = ppo.build_roles(cfg, tok.pad_token_id)
    stops = stop_token_ids(tok)
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"Count from {n}" + " up" * n}], 256) for n in range(4)]
    ids, attn, mask, ended = ppo.generate(roles, prompts, tok, stops, cfg)  # random model: cut at max_new_tokens
    # and the same prompts with responses that stop: a stop token after 1..4 tokens, then pad (as generate leaves them)
    responses = ids[:, -mask.shape[1]:].clone()
    for i in range(len(responses)):
        responses[i, i % responses.shape[1]] = stops[-1]
    stopped_mask, stopped = response_mask(responses, stops)
    responses = responses.masked_fill(stopped_mask == 0, tok.pad_token_id)
    ids2 = torch.cat([ids[:, : -mask.shape[1]], responses], 1)
    attn2 = torch.cat([attn[:, : -mask.shape[1]], stopped_mask], 1)
    assert stopped.all()
    for rows, a in ((ids, attn), (ids2, attn2)):
        ours = ppo.score_responses(roles, rows, a, cfg).tolist()
        plain = plain_rm_scores(base, rm_dir, strip_pad(rows, a), quantization)
        assert ours == pytest.approx(plain, abs=1e-4), (setup, ours, plain)
    # rlhf score / eval: right padding gives the same scores
    from rlhf.scoring import score_pairs
    from rlhf.stage_folder import load_reward_model

    model, rm_tok = load_reward_model(rm_dir, quantization=quantization)
    examples = [{"messages": [{"role": "user", "content": f"Which is larger, {a} or {a + 7}?"}]} for a in (3, 40)]
    batch = score_pairs(model, rm_tok, examples, ["10", "47 or more, clearly"])
    alone = [score_pairs(model, rm_tok, [e], [r])[0] for e, r in zip(examples, ["10", "47 or more, clearly"])]
    assert batch == pytest.approx(alone, abs=1e-4)
    del roles, model

    out = ppo.run(cfg)
    m = json.loads((Path(out) / "manifest.json").read_text())
    assert m["config"]["quantization"] == quantization and m["metrics"]["steps"] == 1


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_rm_from_unquantized_sft(quantization, tiny_model_dir, data, tmp_path):
    """`rlhf rm --quantization 4bit|8bit` on an SFT folder trained unquantized: trains, and the score head and LoRA
    weights stay fp32 (trl casts a quantized model's trainable weights to bf16; docs/quantization.md)."""
    from safetensors.torch import load_file

    base = tiny_model_dir("llama")
    common = dict(max_steps=3, max_length=48, logging_steps=1, save_steps=50, per_device_train_batch_size=4,
                  learning_rate=1e-3)
    sft_dir = sft.run(load_config(sft.SFTConfig, None, dict(common, model_name_or_path=base, dataset=[data["sft"]],
                                                            output_dir=str(tmp_path / "sft"), task_eval_samples=0)))
    rm_dir = rm.run(load_config(rm.RMConfig, None, dict(common, sft_dir=sft_dir, dataset=[data["pref"]],
                                                        output_dir=str(tmp_path / "rm"), quantization=quantization)))
    m = json.loads((Path(rm_dir) / "manifest.json").read_text())
    assert m["config"]["quantization"] == quantization
    weights = load_file(str(Path(rm_dir) / "adapter_model.safetensors"))
    assert any("score" in k for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}
