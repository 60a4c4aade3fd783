"""The SFT stage on a tiny random model: the loss falls, the folder follows the contract and reloads with
plain peft to the same logits, bad inputs give clear errors, an interrupted run is refused until resumed."""
import json
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.manifest import StageError, check_parent, work_dir
from rlhf.stages import sft
from helpers import write_jsonl


def sft_cfg(base, out, data, **kw):
    values = dict(model_name_or_path=base, dataset=data, output_dir=str(out), max_steps=30, learning_rate=1e-2,
                  per_device_train_batch_size=4, logging_steps=5, save_steps=10, lora_r=8, max_length=64,
                  task_eval_samples=0, lora_target="all-linear", lora_alpha=16)
    values.update(kw)
    return load_config(sft.SFTConfig, None, values)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("sft")
    rows = [{"instruction": f"Say the number after {i}.", "input": "", "output": f"{i + 1}"} for i in range(10, 60)]
    data = write_jsonl(tmp / "count.jsonl", rows)
    out = sft.run(sft_cfg(base, tmp / "out", data, val_size=0.2))
    return base, Path(out), data


def test_loss_falls_and_folder_follows_contract(sft_run):
    base, out, _ = sft_run
    m = check_parent(out, "sft", for_stage="test", base_model=base)
    # a random tiny model's frozen head caps how far LoRA can move the loss; the demo test checks a real fall
    assert m["metrics"]["train_loss_last"] < 0.95 * m["metrics"]["train_loss_first"]
    assert m["metrics"]["eval_loss"] < m["metrics"]["eval_loss_first"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json",
              "train_log.jsonl", "training_curves.png", "manifest.json"):
        assert (out / f).is_file(), f
    assert m["config"]["template"] and m["datasets"] and m["versions"]["torch"]
    assert not work_dir(out).exists()


def test_reloads_with_plain_peft_to_same_logits(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import ModelConfig
    from rlhf.loader import AdapterSpec, load_model

    base, out, _ = sft_run
    tok = AutoTokenizer.from_pretrained(out)
    x = tok("Say the number after 12.", return_tensors="pt")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    ours = load_model(ModelConfig(model_name_or_path=base), adapters=[AdapterSpec("default", folder=str(out))],
                      for_training=False)
    with torch.no_grad():
        a, b = plain(**x).logits, ours(**x).logits
        bare = AutoModelForCausalLM.from_pretrained(base)(**x).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, bare, atol=1e-3)  # the adapter did something


def test_held_out_loss_is_per_token_and_metrics_are_logged(sft_run):
    """The manifest's eval_loss is rlhf.evaluate.lm_loss (per assistant token, as `rlhf eval` reports it) of the
    finished adapter on the held-out rows; logging rows carry token accuracy and the tokens seen."""
    from rlhf.config import ModelConfig
    from rlhf.evaluate import lm_loss
    from rlhf.loader import AdapterSpec, load_model, load_tokenizer
    from rlhf.train_utils import load_train_eval, read_log

    base, out, data = sft_run
    m = json.loads((out / "manifest.json").read_text())
    _, held, _ = load_train_eval(sft_cfg(base, out, data, val_size=0.2), kind="sft")
    model = load_model(ModelConfig(model_name_or_path=base), adapters=[AdapterSpec("default", folder=str(out))],
                       for_training=False)
    loss, tokens = lm_loss(model, load_tokenizer(str(out)), held, max_length=64)
    assert m["metrics"]["eval_loss"] == pytest.approx(loss, abs=1e-4)
    rows = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20, 25, 30]
    assert all(0 <= r["mean_token_accuracy"] <= 1 for r in rows)
    seen = [r["num_tokens"] for r in rows]
    assert seen == sorted(seen) and seen[0] > 0
    assert [r["eval_tokens"] for r in read_log(out) if "eval_loss" in r][-1] == tokens


def test_bad_inputs(tiny_model_dir, tmp_path):
    from rlhf.data import DataError
    from rlhf.loader import ModelPathError

    base = tiny_model_dir("llama")
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "hi", "output": "yo"}] * 4)
    with pytest.raises(ModelPathError, match="no_such_model"):
        sft.run(sft_cfg(str(tmp_path / "no_such_model"), tmp_path / "o1", [good]))
    with pytest.raises(DataError, match="demo_sfx.*demo_sft"):
        sft.run(sft_cfg(base, tmp_path / "o2", ["demo_sfx"]))
    with pytest.raises(DataError, match="takes.*instruction"):
        sft.run(sft_cfg(base, tmp_path / "o3", ["demo_pref"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*2"):
        sft.run(sft_cfg(base, tmp_path / "o4", [str(bad)]))
    assert not (tmp_path / "o4").exists()


def test_interrupted_run_is_refused_then_resumes(sft_run, tmp_path):
    """A run stopped after a checkpoint leaves only ``.partial``; the next stage refuses it; --resume finishes it."""
    base, _, data = sft_run
    out = tmp_path / "sft"
    cfg = sft_cfg(base, out, [data], max_steps=20, save_steps=10)
    work = work_dir(out)
    work.mkdir(parents=True)
    # simulate a crash after the step-10 checkpoint: run 10 steps into the working folder, then drop the output
    first = sft_cfg(base, tmp_path / "first", [data], max_steps=20, save_steps=10)
    sft.run(first)
    import shutil

    shutil.rmtree(work)
    shutil.copytree(tmp_path / "first", work)
    (work / "manifest.json").unlink()
    for ck in (work / "checkpoints").glob("checkpoint-20"):
        shutil.rmtree(ck)
    with pytest.raises(StageError, match="did not finish.*resume"):
        check_parent(out, "sft", for_stage="rlhf rm")
    with pytest.raises(StageError, match="unfinished run.*--resume"):
        sft.run(cfg)
    cfg.resume = True
    sft.run(cfg)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 20 and check_parent(out, "sft", for_stage="rlhf rm")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bloom"])
def test_logits_at_labels_give_the_models_own_loss_and_gradients(tiny_model_dir, arch):
    """The output layer run only where a trained token is predicted gives the model's own loss (per trained token)
    and the same gradients, on every architecture of the test matrix, padded batch, accumulated divisor."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.evaluate import label_nll, logits_at_labels

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = attn[2, 5:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :4] = -100  # the prompt
    own = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=40).loss
    own_grads = torch.autograd.grad(own, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    with logits_at_labels(model, labels):
        logits = model(input_ids=ids, attention_mask=attn).logits
    assert logits.shape[0] == int((labels[:, 1:] != -100).sum()) < ids.numel() // 2
    ours = label_nll(logits, labels, num_items_in_batch=40)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(ours, own)
    for a, b in zip(grads, own_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)
    assert model(input_ids=ids).logits.shape[:2] == ids.shape  # the hook is gone
