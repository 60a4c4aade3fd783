"""The RM stage on a tiny model: trains from the SFT folder, the score head is saved with the adapter and
scores the same after a reload with plain transformers + peft; bad parents and bad pairs are reported."""
import json
from pathlib import Path

import pytest
import torch

from rlhf.cli.use import score_file
from rlhf.config import load_config
from rlhf.manifest import StageError, check_parent
from rlhf.scoring import score_pairs
from rlhf.stage_folder import load_reward_model
from rlhf.stages import rm, sft
from helpers import write_jsonl


def pairs(lo, hi):
    return [{"instruction": f"Which is larger, {a} or {a + 7}?", "input": "", "chosen": str(a + 7),
             "rejected": str(a)} for a in range(lo, hi)]


def rm_cfg(out, data, **kw):
    values = dict(dataset=data, output_dir=str(out), max_steps=20, learning_rate=1e-2, per_device_train_batch_size=4,
                  logging_steps=5, save_steps=50, max_length=64, lora_target="all-linear")
    values.update(kw)
    return load_config(rm.RMConfig, None, values)


@pytest.fixture(scope="module")
def parents(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "sft.jsonl", [{"instruction": f"Repeat {i}", "output": str(i)} for i in range(20)])
    sft_dir = sft.run(load_config(sft.SFTConfig, None,
                                  dict(model_name_or_path=base, dataset=data, output_dir=str(tmp / "sft"),
                                                            max_steps=4, task_eval_samples=0, max_length=64)))
    train = write_jsonl(tmp / "pref.jsonl", pairs(10, 60))
    evals = write_jsonl(tmp / "pref_eval.jsonl", pairs(60, 83))  # 23 pairs: eval batches of 8, 8 and 7
    rm_dir = rm.run(rm_cfg(tmp / "rm", [train], sft_dir=sft_dir, eval_dataset=[evals]))
    return base, sft_dir, rm_dir, tmp


def test_rm_folder_and_metrics(parents):
    base, sft_dir, rm_dir, _ = parents
    m = check_parent(rm_dir, "rm", for_stage="test", base_model=base)
    assert m["parent"]["stage"] == "sft" and m["parent"]["path"] == str(Path(sft_dir).resolve())
    assert 0.0 <= m["metrics"]["eval_accuracy"] <= 1.0 and "eval_margin" in m["metrics"]
    assert m["metrics"]["train_loss_last"] < m["metrics"]["train_loss_first"]
    cfg = json.loads((Path(rm_dir) / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"]
    assert (Path(rm_dir) / "training_curves.png").is_file()


def test_plain_reload_scores_identically(parents):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base, _, rm_dir, _ = parents
    ours, tok = load_reward_model(rm_dir)
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
                                      rm_dir).eval()
    plain.config.pad_token_id = tok.pad_token_id
    examples = [{"messages": [{"role": "user", "content": f"Which is larger, {a} or {a + 7}?"}]} for a in (61, 70)]
    responses = ["68", "70"]
    s1 = score_pairs(ours, tok, examples, responses)
    s2 = score_pairs(plain, tok, examples, responses)
    assert torch.allclose(torch.tensor(s1), torch.tensor(s2), atol=1e-5)
    # the head is the trained one, not a fresh random head
    from rlhf.loader import load_score_head

    head = load_score_head(rm_dir)
    assert torch.allclose(head.weight, plain.base_model.model.score.modules_to_save["default"].weight)


def test_score_file(parents, tmp_path):
    _, _, rm_dir, _ = parents
    inp = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Which is larger, 3 or 9?", "response": "9"},
                                              {"instruction": "Which is larger, 3 or 9?", "response": "3"}])
    n = score_file(rm_dir, inp, str(tmp_path / "out.jsonl"))
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 2 and all(isinstance(r["score"], float) for r in rows) and rows[0]["response"] == "9"


def test_bad_parents_and_data(parents, tiny_model_dir, tmp_path):
    from rlhf.data import DataError

    base, sft_dir, rm_dir, tmp = parents
    train = str(tmp / "pref.jsonl")
    with pytest.raises(StageError, match="output of `rlhf rm`.*needs a sft folder.*run rlhf sft first"):
        rm.run(rm_cfg(tmp_path / "o1", [train], sft_dir=rm_dir))
    with pytest.raises(StageError, match="does not exist: run rlhf sft first"):
        rm.run(rm_cfg(tmp_path / "o2", [train], sft_dir=str(tmp_path / "nothing")))
    with pytest.raises(StageError, match="trained on base model"):
        rm.run(rm_cfg(tmp_path / "o3", [train], sft_dir=sft_dir, model_name_or_path=tiny_model_dir("gpt2")))
    with pytest.raises(DataError, match="takes.*preference"):
        rm.run(rm_cfg(tmp_path / "o4", [str(tmp / "sft.jsonl")], sft_dir=sft_dir))


def test_identical_and_truncated_pairs_are_counted(parents, tmp_path):
    base, sft_dir, _, _ = parents
    long = "word " * 80
    rows = pairs(10, 18) + [{"instruction": "same?", "chosen": "yes", "rejected": "yes"}] + \
        [{"instruction": long, "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="chosen == rejected|identical"):
        out = rm.run(rm_cfg(tmp_path / "o", [data], sft_dir=sft_dir, max_steps=2, max_length=48))
    m = check_parent(out, "rm", for_stage="test")
    assert m["metrics"]["identical_after_truncation"] == 1  # the long prompt cut both replies off
    assert m["metrics"]["truncated"] == 1


def test_eval_accuracy_is_the_share_of_all_pairs(parents):
    """trl averages per-batch accuracies (a short last batch weighs as much as a full one); the manifest's
    eval_accuracy and eval_margin are over all 23 held-out pairs, as `rlhf eval` counts them."""
    from rlhf.data import load_examples

    _, _, rm_dir, tmp = parents
    metrics = json.loads((Path(rm_dir) / "manifest.json").read_text())["metrics"]
    model, tok = load_reward_model(rm_dir)
    rows = load_examples([str(tmp / "pref_eval.jsonl")], kind="preference")
    chosen = score_pairs(model, tok, rows, [r["chosen"] for r in rows])
    rejected = score_pairs(model, tok, rows, [r["rejected"] for r in rows])
    assert metrics["eval_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(rows), abs=1e-6)
    assert metrics["eval_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / len(rows), abs=1e-4)
