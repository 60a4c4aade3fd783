"""Using stage folders: export (merged model == adapter model), chat through a pseudo-terminal, batched generate,
and eval, whose numbers are recomputed here with plain transformers + peft. The SFT -> RM -> PPO folders are made
by the real stages, a few steps each, on a tiny llama."""
import json
import os
import pty
import re
import select
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from rlhf.cli import cli
from rlhf.config import load_config
from rlhf.cli.use import chat
from helpers import write_jsonl

PAIRS = [(a, b) for a in range(10, 90, 7) for b in range(13, 90, 11) if a != b]


def question(a, b):
    return f"Which is larger, {a} or {b}?"


@pytest.fixture(scope="module")
def chain(tiny_model_dir, tmp_path_factory):
    """base, sft, rm, ppo folders and a registry (with the demo metric) of small comparison datasets."""
    from rlhf.stages import ppo, rm, sft

    base = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("use")
    train, held = PAIRS[:60], PAIRS[60:68]
    sft_rows = lambda ps: [{"instruction": question(a, b), "output": str(max(a, b)), "answer": str(max(a, b))} for a,
                           b in ps]  # noqa: E731
    pref_rows = lambda ps: [{"instruction": question(a, b), "chosen": str(max(a, b)), "rejected": str(min(a, b))} for a,
                            b in ps]  # noqa: E731
    write_jsonl(tmp / "sft.jsonl", sft_rows(train))
    write_jsonl(tmp / "sft_eval.jsonl", sft_rows(held))
    write_jsonl(tmp / "pref.jsonl", pref_rows(train))
    write_jsonl(tmp / "pref_eval.jsonl", pref_rows(held))
    write_jsonl(tmp / "prompts.jsonl", [{"instruction": question(a, b), "answer": str(max(a, b))} for a, b in held])
    reg = {"t_sft": {"path": "sft.jsonl", "format": "instruction"},
           "t_sft_eval": {"path": "sft_eval.jsonl", "format": "instruction", "metric": "demo_task"},
           "t_pref": {"path": "pref.jsonl", "format": "preference"},
           "t_pref_eval": {"path": "pref_eval.jsonl", "format": "preference"},
           "t_prompts": {"path": "prompts.jsonl", "format": "prompt", "metric": "demo_task"}}
    (tmp / "reg.json").write_text(json.dumps({k: {"source": "file", **v} for k, v in reg.items()}))
    common = dict(registry_file=str(tmp / "reg.json"), max_length=64, lora_target="all-linear", logging_steps=5,
                  save_steps=100, per_device_train_batch_size=4, seed=1)
    sft_dir = sft.run(load_config(sft.SFTConfig, None, dict(
        common, model_name_or_path=base, dataset="t_sft", eval_dataset="t_sft_eval", output_dir=str(tmp / "sft"),
        max_steps=5, learning_rate=1e-3, task_eval_samples=0, max_new_tokens=6)))
    rm_dir = rm.run(load_config(rm.RMConfig, None, dict(
        common, sft_dir=sft_dir, dataset="t_pref", eval_dataset="t_pref_eval", output_dir=str(tmp / "rm"),
        max_steps=10, learning_rate=1e-2)))
    ppo_dir = ppo.run(load_config(ppo.PPOConfig, None, dict(
        common, sft_dir=sft_dir, rm_dir=rm_dir, dataset="t_sft", eval_dataset="t_prompts", output_dir=str(tmp / "ppo"),
        max_steps=2, batch_size=4, mini_batch_size=4, per_device_train_batch_size=4, ppo_epochs=1, max_new_tokens=6,
        eval_samples=0, learning_rate=1e-2, sample_every=0)))
    return {"base": base, "sft": sft_dir, "rm": rm_dir, "ppo": ppo_dir, "tmp": tmp, "registry": str(tmp / "reg.json")}


# ---------------------------------------------------------------------------------------------------------------
# independent references: plain transformers + peft, the tokenizer's own chat template, one prompt at a time


def plain_policy(base, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()


def plain_rm(base, folder, pad_id):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad_id)
    m = PeftModel.from_pretrained(base_model, folder)
    return m.eval()


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def greedy_reply(model, tok, messages, max_new_tokens=6):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((k for k, t in enumerate(out) if t in stops), len(out))
    return tok.decode(out[:cut], skip_special_tokens=True)


def rm_score(model, tok, messages, reply):
    text = tok.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    text = text[: text.rindex("<|im_end|>") + len("<|im_end|>")]  # the score is read at the end-of-turn token
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def user(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_sft_and_ppo_match_the_adapter_model(chain, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tokenizer_of(chain["sft"])
    x = tok(question(12, 77), return_tensors="pt")
    for stage in ("sft", "ppo"):
        out = tmp_path / stage
        r = CliRunner().invoke(cli, ["export", chain[stage], "--out", str(out), "--dtype", "float32",
                                     "--max-shard-size", "100KB"])
        assert r.exit_code == 0, r.output
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1  # sharded
        assert not (out / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        with torch.no_grad():
            want = plain_policy(chain["base"], chain[stage])(**x).logits
            got = merged(**x).logits
            bare = AutoModelForCausalLM.from_pretrained(chain["base"])(**x).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, bare, atol=1e-3)  # the adapter is in the weights
        t = tokenizer_of(str(out))
        assert t.chat_template == tok.chat_template
        assert set(merged.generation_config.eos_token_id) == {t.eos_token_id, t.convert_tokens_to_ids("<|im_end|>")}
    assert json.loads((tmp_path / "ppo" / "rlhf_export.json").read_text())["stage"] == "ppo"


def test_export_rm_keeps_the_score_head_and_bf16(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer_of(chain["rm"])
    x = tok([question(12, 77) + " 77", "Hi there"], return_tensors="pt", padding=True)
    r = CliRunner().invoke(cli, ["export", chain["rm"], "--out", str(tmp_path / "rm32"), "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm32")).eval()
    with torch.no_grad():
        want = plain_rm(chain["base"], chain["rm"], tok.pad_token_id)(**x).logits
        got = merged(**x).logits
    assert got.shape == (2, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(cli, ["export", chain["rm"], "--out", str(tmp_path / "rm16")])  # default bf16
    assert r.exit_code == 0, r.output
    half = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm16"))
    assert half.dtype == torch.bfloat16 and half.config.pad_token_id == tok.pad_token_id


def test_export_refuses_existing_target_and_non_stage_folders(chain, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["export", chain["sft"], "--out", str(out)])
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    assert (out / "keep.txt").is_file()
    r = CliRunner().invoke(cli, ["export", chain["sft"], "--out", str(out), "--overwrite", "--dtype", "fp16"])
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "again")])  # an export is no stage folder
    assert r.exit_code == 1 and "not a stage folder" in r.output and "plain transformers model" in r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(cli, ["export", chain["sft"], "--out", chain["sft"], "--overwrite"])
    assert r.exit_code == 1 and "would replace the stage folder" in r.output
    assert not list(tmp_path.glob("*.partial"))


def test_export_of_a_4bit_stage_merges_into_an_unquantized_base(chain, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from rlhf.stages import sft

    q = sft.run(load_config(sft.SFTConfig, None, dict(
        model_name_or_path=chain["base"], dataset="t_sft", registry_file=chain["registry"],
        output_dir=str(tmp_path / "q"),
        quantization="4bit", max_steps=2, max_length=64, task_eval_samples=0, lora_target="all-linear")))
    r = CliRunner().invoke(cli, ["export", q, "--out", str(tmp_path / "qx"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "trained on a 4bit base; reloading the base unquantized (float32) for the merge" in r.output
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "qx"))
    assert "quantization_config" not in merged.config.to_dict()
    x = tokenizer_of(q)(question(3, 4), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, plain_policy(chain["base"], q)(**x).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# chat


class Terminal:
    """``fn()`` in a child process whose stdin/stdout/stderr are a pseudo-terminal (forked: no import cost);
    read its output until a marker, type lines."""

    def __init__(self, fn):
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: the terminal is fds 0-2 (pytest's capture objects are dropped)
            code = 1
            try:
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                fn()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                os._exit(code)
        self.buf = ""

    def read_until(self, marker: str, timeout: float = 60.0) -> str:
        end = time.time() + timeout
        while marker not in self.buf:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} from the chat; it printed:\n{self.buf}")
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat ended before {marker!r}; it printed:\n{self.buf}")
                self.buf += chunk.decode("utf-8", "replace")
        text, self.buf = self.buf.split(marker, 1)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def exit_code(self, timeout: float = 30.0) -> int:
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError("the chat did not exit")

    def close(self) -> None:
        try:
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.master)


def test_chat_in_a_terminal_answers_keeps_history_and_resets(chain):
    model, tok = plain_policy(chain["base"], chain["sft"]), tokenizer_of(chain["sft"])
    q1, q2 = question(12, 77), "Say more."
    a1 = greedy_reply(model, tok, user(q1))
    with_history = greedy_reply(model, tok, user(q1) + [{"role": "assistant", "content": a1}] + user(q2))
    alone = greedy_reply(model, tok, user(q2))
    assert with_history != alone  # the test can tell history from none

    args = [chain["sft"], "--temperature", "0", "--max-new-tokens", "6"]
    term = Terminal(lambda: chat.main(args=args, prog_name="rlhf chat"))
    try:
        assert "/reset" in term.read_until("you> ")
        replies = []
        for line in (q1, q2, "/reset", q2):
            term.type(line)
            said = term.read_until("you> ")
            replies.append(said.split("bot> ", 1)[1].rstrip("\n") if "bot> " in said else said)
        assert replies[0] == a1
        assert replies[1] == with_history  # the second turn saw the first
        assert "history cleared" in replies[2]
        assert replies[3] == alone
        term.type("/exit")
        assert term.exit_code() == 0
    finally:
        term.close()


# ---------------------------------------------------------------------------------------------------------------
# generate


def test_generate_batches_match_one_by_one_replies(chain, tmp_path):
    rows = [{"instruction": question(12, 77), "id": 1},
            {"instruction": "Which is larger?", "input": "31 or 45", "id": 2},
            {"messages": [{"role": "user", "content": "Hi"}], "id": 3}, {"prompt": question(5, 6), "id": 4},
            {"instruction": "Say more.", "system": "Be brief.", "id": 5}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(cli, ["generate", chain["ppo"], "--input", inp, "--output", str(out), "--batch-size", "2",
                                 "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    model, tok = plain_policy(chain["base"], chain["ppo"]), tokenizer_of(chain["ppo"])
    msgs = [user(question(12, 77)), user("Which is larger?\n31 or 45"), user("Hi"), user(question(5, 6)),
            [{"role": "system", "content": "Be brief."}] + user("Say more.")]
    assert [g["id"] for g in got] == [1, 2, 3, 4, 5]
    assert [{k: v for k, v in g.items() if k != "response"} for g in got] == rows
    assert [g["response"] for g in got] == [greedy_reply(model, tok, m) for m in msgs]


def test_generate_bad_inputs(chain, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": "fine"}\n{"instruction": "broken"\n')
    r = CliRunner().invoke(cli, ["generate", chain["sft"], "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and re.search(r"bad\.jsonl, line 3: not valid JSON", r.output), r.output
    bad.write_text('{"instruction": "ok"}\n{"question": "no prompt here"}\n')
    r = CliRunner().invoke(cli, ["generate", chain["sft"], "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "bad.jsonl, line 2" in r.output, r.output
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "hi"}, {"instruction": "word " * 100}])
    r = CliRunner().invoke(cli, ["generate", chain["sft"], "--input", long, "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "long.jsonl, line 2: prompt longer than --max-length 64" in r.output, r.output
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "hi"}])
    r = CliRunner().invoke(cli, ["generate", chain["rm"], "--input", good, "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "is a reward model" in r.output
    r = CliRunner().invoke(cli, ["generate", str(tmp_path), "--input", good, "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "not a finished stage folder" in r.output
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# eval


def test_eval_sft_loss_perplexity_and_task_metric(chain, tmp_path):
    from rlhf.demo_task import extract_answer
    from rlhf.templates import encode_sft

    model, tok = plain_policy(chain["base"], chain["sft"]), tokenizer_of(chain["sft"])
    held = PAIRS[60:68]
    replies = [greedy_reply(model, tok, user(question(a, b))) for a, b in held]
    # the checkable answer is the model's own reply on even rows and wrong on odd ones: the metric must be 0.5
    rows = [{"instruction": question(a, b), "output": str(max(a, b)),
             "answer": extract_answer(r) if i % 2 == 0 else "wrong"}
            for i, ((a, b), r) in enumerate(zip(held, replies))]
    write_jsonl(tmp_path / "check.jsonl", rows)
    (tmp_path / "reg.json").write_text(json.dumps({"t_check": {"source": "file", "path": "check.jsonl",
                                                               "format": "instruction", "metric": "demo_task"}}))
    js = tmp_path / "e.json"
    r = CliRunner().invoke(cli,
                           ["eval", chain["sft"], "--dataset", "t_check", "--registry-file", str(tmp_path / "reg.json"),
                                      "--json-out", str(js), "--max-new-tokens", "6", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["datasets"] == ["t_check"] and res["stage"] == "sft"
    m = res["metrics"]
    nll = n = 0.0
    for (a, b), row in zip(held, rows):
        enc = encode_sft(tok, user(row["instruction"]) + [{"role": "assistant", "content": row["output"]}], 64)
        labels = torch.tensor([enc["labels"]])
        k = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += model(input_ids=torch.tensor([enc["input_ids"]]), labels=labels).loss.item() * k
        n += k
    assert m["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert m["perplexity"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-4)
    assert m["loss_tokens"] == n
    assert m["task_metric"] == 0.5 and m["task_prompts"] == len(held)
    for key in ("loss", "perplexity", "task_metric"):  # the table
        assert re.search(rf"^{key} +[0-9.]+$", r.output, re.M), r.output


def test_eval_rm_pairwise_accuracy(chain, tmp_path):
    js = tmp_path / "rm.json"
    r = CliRunner().invoke(cli, ["eval", chain["rm"], "--dataset", "t_pref_eval", "--json-out", str(js)])
    assert r.exit_code == 0, r.output
    m = json.loads(js.read_text())["metrics"]
    tok = tokenizer_of(chain["rm"])
    model = plain_rm(chain["base"], chain["rm"], tok.pad_token_id)
    held = PAIRS[60:68]
    margins = [rm_score(model, tok, user(question(a, b)),
                        str(max(a, b))) - rm_score(model, tok, user(question(a, b)), str(min(a, b)))
               for a, b in held]
    assert m["pairs"] == len(held)
    assert m["accuracy"] == pytest.approx(sum(d > 0 for d in margins) / len(held))
    assert m["margin_mean"] == pytest.approx(sum(margins) / len(held), abs=1e-5)
    assert "accuracy" in r.output


def test_eval_policy_reward_and_win_rate_against_baseline(chain, tmp_path):
    js = tmp_path / "ppo.json"
    r = CliRunner().invoke(cli, ["eval", chain["ppo"], "--rm", chain["rm"], "--baseline", chain["sft"], "--json-out",
                                 str(js),
                                      "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["datasets"] == ["t_prompts"]  # the PPO folder's eval_dataset: prompts, no answers -> no loss
    tok = tokenizer_of(chain["rm"])
    rm_model = plain_rm(chain["base"], chain["rm"], tok.pad_token_id)
    held = PAIRS[60:68]
    scores = {}
    for stage in ("ppo", "sft"):
        policy = plain_policy(chain["base"], chain[stage])
        scores[stage] = [rm_score(rm_model, tok, user(question(a, b)), greedy_reply(policy, tok, user(question(a, b))))
                         for a, b in held]
    mine, base = res["metrics"], res["baseline"]["metrics"]
    assert "loss" not in mine
    assert mine["reward_mean"] == pytest.approx(sum(scores["ppo"]) / len(held), abs=1e-5)
    assert base["reward_mean"] == pytest.approx(sum(scores["sft"]) / len(held), abs=1e-5)
    wins = sum(1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(scores["ppo"], scores["sft"])) / len(held)
    assert mine["win_rate"] == pytest.approx(wins) and base["win_rate"] == pytest.approx(1 - wins)
    assert "task_metric" in mine and "task_metric" in base
    header = next(line for line in r.output.splitlines() if line.startswith("metric "))
    assert chain["ppo"] in header and "(baseline)" in header  # one table, a column per folder


def test_eval_bad_inputs(chain):
    r = CliRunner().invoke(cli, ["eval", chain["rm"], "--dataset", "t_prompts"])
    assert r.exit_code == 1 and "preference pairs" in r.output
    r = CliRunner().invoke(cli, ["eval", chain["sft"], "--baseline", chain["rm"]])
    assert r.exit_code == 1 and "is a reward model" in r.output
    r = CliRunner().invoke(cli, ["eval", chain["sft"], "--rm", chain["sft"]])
    assert r.exit_code == 1 and "needs a rm folder" in r.output


def test_chat_history_drops_oldest_exchanges_to_fit(tiny_model_dir):
    from rlhf.loader import load_tokenizer
    from rlhf.templates import apply_template, encode_prompt
    from rlhf.cli.use import fit_history

    tok = load_tokenizer(tiny_model_dir("llama"))
    apply_template(tok, "chatml")
    sys_msg = [{"role": "system", "content": "Be brief."}]
    turns = []
    for i in range(3):
        turns += [{"role": "user", "content": f"Question number {i}?"},
                  {"role": "assistant", "content": f"Answer {i}."}]
    convo = sys_msg + turns + user("Last one?")
    full = encode_prompt(tok, convo, 10_000)
    ids, kept = fit_history(tok, convo, len(full))
    assert kept == convo and ids == full
    last_two = sys_msg + turns[2:] + user("Last one?")  # without the first exchange
    ids, kept = fit_history(tok, convo, len(encode_prompt(tok, last_two, 10_000)))
    assert kept == last_two and ids == encode_prompt(tok, last_two, 10_000)
    ids, kept = fit_history(tok, convo, len(encode_prompt(tok, sys_msg + user("Last one?"), 10_000)))
    assert kept == sys_msg + user("Last one?")
    with pytest.raises(ValueError, match="that message alone is longer than the 5 tokens"):
        fit_history(tok, convo, 5)
