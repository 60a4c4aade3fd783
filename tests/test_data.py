"""The dataset registry, formats and validation, on small files written here."""
import csv
import hashlib
import json
import os
import warnings

import pytest
import yaml

from helpers import write_jsonl as jsonl
from rlhf.data import (FORMATS, DataError, DataWarning, builtin_registry_file, describe, fingerprint,
                       list_datasets, load_examples, load_registry)

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def registry(path, entries):
    path.write_text(yaml.safe_dump(entries))
    return str(path)


# ---------------------------------------------------------------------------
# Formats and column maps


def test_alpaca_with_history_and_system(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 3", "output": "5", "system": "Be brief.",
         "history": [["hi", "hello"]], "answer": "5"},
        {"instruction": "Greet", "input": "", "output": "Hi!"},
    ])
    ex = load_examples([f], kind="sft")
    assert ex[0]["messages"] == [S("Be brief."), U("hi"), A("hello"), U("Add\n2 3"), A("5")]
    assert ex[0]["meta"] == {"dataset": f, "file": f, "row": 1, "answer": "5"}
    assert ex[1]["messages"] == [U("Greet"), A("Hi!")]
    assert set(ex[1]) == {"messages", "meta"}
    prompts = load_examples([f], kind="prompt")
    assert prompts[0]["messages"] == [S("Be brief."), U("hi"), A("hello"), U("Add\n2 3")]


def test_column_map_and_sharegpt_custom_tags(tmp_path):
    jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "reply": "Because.", "id": 7}])
    jsonl(tmp_path / "c.jsonl", [{"dialog": [{"speaker": "SYS", "text": "Be kind."}, {"speaker": "USER", "text": "Hi"},
                                             {"speaker": "BOT", "text": "Hello"}, {"speaker": "USER", "text": "Bye"},
                                             {"speaker": "BOT", "text": "Bye!"}]}])
    reg = registry(tmp_path / "reg.yaml", {
        "qa": {"path": "q.jsonl", "format": "instruction", "columns": {"instruction": "question", "output": "reply"}},
        "chat": {"path": "c.jsonl", "format": "conversation", "columns": {"messages": "dialog"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "USER", "assistant_tag": "BOT",
                          "system_tag": "SYS"}},
    })
    qa = load_examples(["qa"], kind="sft", registry_file=reg)
    assert qa[0]["messages"] == [U("Why?"), A("Because.")] and qa[0]["meta"]["id"] == 7
    chat = load_examples(["chat"], kind="sft", registry_file=reg)
    assert chat[0]["messages"] == [S("Be kind."), U("Hi"), A("Hello"), U("Bye"), A("Bye!")]
    assert load_examples(["chat"], kind="prompt", registry_file=reg)[0]["messages"][-1] == U("Bye")


def test_sharegpt_default_tags_and_openai_messages(tmp_path):
    f = jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Sys"},
        {"messages": [S("Be kind."), U("Hi"), A("Hello")]},
        {"messages": [U("Hi"), {"role": "assistant", "content": [{"type": "text", "text": "Hel"},
                                                                 {"type": "text", "text": "lo"}]}]},
    ])
    ex = load_examples([f], kind="sft")
    assert [e["messages"] for e in ex] == [[S("Sys"), U("Hi"), A("Hello")], [S("Be kind."), U("Hi"), A("Hello")],
                                           [U("Hi"), A("Hello")]]


def test_preference_string_and_conversation_forms_and_hh(tmp_path):
    ins = jsonl(tmp_path / "p.jsonl",
                [{"instruction": "Add", "input": "2 3", "chosen": "5", "rejected": "6", "answer": "5"},
                                       {"instruction": "JSON?", "chosen": '[{"a": 1}]', "rejected": "{}"}])
    conv = jsonl(tmp_path / "c.jsonl", [{
        "prompt": "Hi", "chosen": [U("Hi"), A("Hello"), U("How?"), A("Well.")],
        "rejected": [U("Hi"), A("Hello"), U("How?"), A("Bad.")]}])
    replies = jsonl(tmp_path / "r.jsonl", [{"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("Go away")]}])
    hh = jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the cat "
                  "sit?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."}])
    e = load_examples([ins], kind="preference")[0]
    assert (e["messages"], e["chosen"], e["rejected"], e["meta"]["answer"]) == ([U("Add\n2 3")], "5", "6", "5")
    assert load_examples([ins], kind="preference")[1]["chosen"] == '[{"a": 1}]'  # text that looks like JSON stays text
    e = load_examples([conv], kind="preference")[0]
    assert (e["messages"], e["chosen"], e["rejected"]) == ([U("Hi"), A("Hello"), U("How?")], "Well.", "Bad.")
    e = load_examples([replies], kind="preference")[0]
    assert (e["messages"], e["chosen"], e["rejected"]) == ([U("Hi")], "Hello", "Go away")
    e = load_examples([hh], kind="preference")[0]  # inferred: hh style
    assert e["messages"] == [U("Hi there"), A("Hello!"), U("Tell me a joke.")]
    assert (e["chosen"], e["rejected"]) == ("Why did the cat sit?", "No.")
    reg = registry(tmp_path / "reg.yaml", {"hh": {"path": "hh.jsonl", "format": "preference", "style": "hh"}})
    assert load_examples(["hh"], kind="prompt", registry_file=reg)[0] == {
        "messages": [U("Hi there"), A("Hello!"), U("Tell me a joke.")],
        "meta": {"dataset": "hh", "file": str(tmp_path / "hh.jsonl"), "row": 1}}


def test_prompt_and_text_formats(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"instruction": "Add", "input": "2 3", "answer": "5"}, {"prompt": "Why?"},
                                     {"messages": [S("s"), U("Hi")]}])
    reg = registry(tmp_path / "reg.yaml", {"p": {"path": "p.jsonl", "format": "prompt"},
                                           "t": {"path": "t.jsonl", "format": "text"}})
    ex = load_examples(["p"], kind="prompt", registry_file=reg)
    assert [e["messages"] for e in ex] == [[U("Add\n2 3")], [U("Why?")], [S("s"), U("Hi")]]
    assert ex[0]["meta"]["answer"] == "5"
    jsonl(tmp_path / "t.jsonl", [{"text": "once upon a time"}, {"text": "the end"}])
    assert [e["text"] for e in load_examples(["t"], kind="text", registry_file=reg)] == ["once upon a time", "the end"]
    assert load_examples([p], kind="prompt")[0]["messages"] == [U("Add\n2 3")]  # plain file: format inferred


def test_csv_json_parquet_and_txt_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output", "history"])
        w.writeheader()
        w.writerow({"instruction": "Add", "input": "1 1", "output": "2", "history": ""})
        w.writerow({"instruction": "Add", "input": "", "output": "[1, 2]", "history": '[["hi", "hello"]]'})
    assert load_examples([str(tmp_path / "a.csv")],
                         kind="sft")[1]["messages"] == [U("hi"), A("hello"), U("Add"), A("[1, 2]")]
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "1 1", "output": "2"}]))
    pq.write_table(pa.Table.from_pylist([{"instruction": "Add", "input": "1 1", "output": "2"}]),
                   tmp_path / "a.parquet")
    for name in ("a.csv", "a.json", "a.parquet"):
        assert load_examples([str(tmp_path / name)], kind="sft")[0]["messages"] == [U("Add\n1 1"), A("2")]
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON lines saved as .json
    assert len(load_examples([str(tmp_path / "lines.json")], kind="text")) == 2
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    assert [e["text"] for e in load_examples([str(tmp_path / "t.txt")], kind="text")] == ["first line", "second line"]


def test_llamafactory_dataset_info(tmp_path):
    jsonl(tmp_path / "alp.jsonl", [{"q": "Add", "ctx": "2 3", "a": "5", "sys": "S", "hist": [["hi", "hello"]]}])
    jsonl(tmp_path / "sg.jsonl",
          [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    jsonl(tmp_path / "oa.jsonl", [{"messages": [S("s"), U("Hi"), A("Yo")]}])
    jsonl(tmp_path / "rank.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}],
                                     "chosen": {"from": "gpt", "value": "Hello"},
                                     "rejected": {"from": "gpt", "value": "Go"}}])
    jsonl(tmp_path / "arank.jsonl", [{"instruction": "Add", "input": "2 3", "chosen": "5", "rejected": "6"}])
    jsonl(tmp_path / "pt.jsonl", [{"text": "a document"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "alp": {"file_name": "alp.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys",
                                                      "history": "hist"}},
        "sg": {"file_name": "sg.jsonl", "formatting": "sharegpt"},
        "oa": {"file_name": "oa.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                        "system_tag": "system"}},
        "rank": {"file_name": "rank.jsonl", "formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "arank": {"file_name": "arank.jsonl", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "pt": {"file_name": "pt.jsonl", "columns": {"prompt": "text"}},
        "hub": {"hf_hub_url": "llamafactory/alpaca_en", "split": "train"},
    }))
    reg = str(tmp_path / "dataset_info.json")
    assert load_examples(["alp"], kind="sft", registry_file=reg)[0]["messages"] == [
        S("S"), U("hi"), A("hello"), U("Add\n2 3"), A("5")]
    assert load_examples(["sg"], kind="sft", registry_file=reg)[0]["messages"] == [U("Hi"), A("Yo")]
    assert load_examples(["oa"], kind="sft", registry_file=reg)[0]["messages"] == [S("s"), U("Hi"), A("Yo")]
    e = load_examples(["rank"], kind="preference", registry_file=reg)[0]
    assert (e["messages"], e["chosen"], e["rejected"]) == ([U("Hi")], "Hello", "Go")
    e = load_examples(["arank"], kind="preference", registry_file=reg)[0]
    assert (e["messages"], e["chosen"], e["rejected"]) == ([U("Add\n2 3")], "5", "6")
    assert load_examples(["pt"], kind="text", registry_file=reg)[0]["text"] == "a document"
    reg_entries = load_registry(reg)
    assert reg_entries["hub"]["source"] == "hub" and reg_entries["hub"]["hub_id"] == "llamafactory/alpaca_en"
    assert reg_entries["demo_sft"]["format"] == "instruction"  # built-in entries stay


# ---------------------------------------------------------------------------
# Mixing, sampling, registries


def test_mixing_num_samples_and_user_registry_override(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(5)])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(3)])
    ex = load_examples([a, b], kind="sft", num_samples=2)
    assert [e["messages"][0]["content"] for e in ex] == ["a0", "a1", "b0", "b1"]
    assert len(load_examples([a, b], kind="sft")) == 8
    reg = registry(tmp_path / "reg.yaml", {
        "demo_sft": {"path": "b.jsonl", "format": "instruction", "description": "mine", "metric": "demo_task"},
        "mine": {"path": "a.jsonl", "format": "instruction", "num_samples": 7},
    })
    entries = load_registry(reg)
    assert entries["demo_sft"]["description"] == "mine" and entries["demo_sft"]["metric"] == "demo_task"
    assert [e["meta"]["file"] for e in load_examples(["demo_sft"], kind="sft", registry_file=reg)] == [b] * 3
    # an entry's own num_samples: seeded sample, repeating rows to reach N
    s1 = load_examples(["mine"], kind="sft", registry_file=reg, seed=1)
    assert len(s1) == 7 and {e["meta"]["row"] for e in s1} == {1, 2, 3, 4, 5}
    assert s1 == load_examples(["mine"], kind="sft", registry_file=reg, seed=1)
    assert s1 != load_examples(["mine"], kind="sft", registry_file=reg, seed=2)


def test_splits_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d" / "1.jsonl", [{"text": "one"}])
    jsonl(tmp_path / "d" / "2.jsonl", [{"text": "two"}])
    jsonl(tmp_path / "test.jsonl", [{"text": "held out"}])
    reg = registry(tmp_path / "reg.yaml", {"d": {"path": "d", "format": "text", "splits": {"test": "test.jsonl"}}})
    assert [e["text"] for e in load_examples(["d"], kind="text", registry_file=reg)] == ["one", "two"]
    assert [e["text"] for e in load_examples(["d"], kind="text", registry_file=reg, split="test")] == ["held out"]
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        load_examples(["d"], kind="text", registry_file=reg, split="validation")


def test_builtin_registry_entries():
    entries = load_registry()
    demo = {"demo_corpus": ("text", "data/demo_corpus.jsonl"), "demo_sft": ("instruction", "data/demo_sft.jsonl"),
            "demo_sft_eval": ("instruction", "data/demo_sft_eval.jsonl"),
            "demo_pref": ("preference", "data/demo_pref.jsonl"),
            "demo_pref_eval": ("preference", "data/demo_pref_eval.jsonl"),
            "demo_prompts": ("prompt", "data/demo_prompts.jsonl"),
            "demo_prompts_eval": ("prompt", "data/demo_prompts_eval.jsonl")}
    base = builtin_registry_file().parent
    for name, (fmt, path) in demo.items():
        assert entries[name]["format"] == fmt and entries[name]["path"] == str(base / path)
        assert entries[name].get("metric") == (None if name == "demo_corpus" else "demo_task")
    hub = {"alpaca": "tatsu-lab/alpaca", "alpaca_gpt4": "vicgalle/alpaca-gpt4", "hh_rlhf": "Anthropic/hh-rlhf",
           "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
           "sharegpt": "anon8231489123/ShareGPT_Vicuna_unfiltered",
           "oasst": "habanoz/oasst_top1_2023-08-25-chat-format"}
    for name, hub_id in hub.items():
        assert entries[name]["source"] == "hub" and entries[name]["hub_id"] == hub_id
        assert entries[name]["format"] in FORMATS and entries[name]["license"] and entries[name]["description"]
    uf = entries["ultrafeedback"]
    assert uf["split"] == "train_prefs" and uf["splits"] == {"test": "test_prefs"}
    assert entries["hh_rlhf"]["style"] == "hh"
    names = [n for n, _, _ in list_datasets()]
    assert set(demo) | set(hub) <= set(names)


def test_hub_entry_that_cannot_be_reached_says_what_to_do():
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (otherwise the hub client retries for ~20 s)")
    with pytest.raises(DataError, match="could not load 'tatsu-lab/alpaca'.*point at the local file"):
        load_examples(["alpaca"], kind="sft")


def test_describe_and_fingerprint(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "x"} for i in range(5)])
    reg = registry(tmp_path / "reg.yaml", {"a": {"path": "a.jsonl", "format": "instruction", "license": "MIT",
                                                 "description": "tiny", "columns": {"output": "output"}}})
    text = describe("a", registry_file=reg)
    for part in ("format:      instruction", "license:     MIT", "description: tiny", "output <- output", '"q2"'):
        assert part in text
    assert '"q3"' not in text
    assert "inferred" in describe(f)
    assert "hub tatsu-lab/alpaca" in describe("alpaca")
    fp = fingerprint(["a", "hh_rlhf", "ultrafeedback"], registry_file=reg)
    assert fp["a"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert fp["hh_rlhf"] == "Anthropic/hh-rlhf@train" and fp["ultrafeedback"].endswith("@train_prefs")


# ---------------------------------------------------------------------------
# Bad input: each error names the file, the row and the column


@pytest.mark.parametrize("rows,match", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], r"line 2: not valid JSON"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "answer": "b"}'],
     r"line 2, column 'output': missing column 'output'.*columns: \{output: your_column\}"),
    (['{"instruction": "a", "output": "b"}', '', '{"instruction": "a", "output": "  "}'],
     r"line 3, column 'output': empty response"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "", "output": "b"}'],
     r"line 2, column 'instruction': empty"),
    (['{"instruction": "a", "output": "b"}', '[1, 2]'], r"line 2: expected a JSON object"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, rows, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_examples([str(f)], kind="sft")
    assert str(e.value).startswith(str(f))


@pytest.mark.parametrize("row,match", [
    ({"instruction": "a", "chosen": "", "rejected": "b"}, r"column 'chosen': empty chosen"),
    ({"instruction": "a", "chosen": "b"}, r"missing column 'rejected'"),
    ({"chosen": [U("a"), A("b")], "rejected": [U("other"), A("c")]}, r"column 'chosen': .*same up to the final"),
    ({"messages": [{"from": "robot", "value": "x"}], "chosen": "a", "rejected": "b"}, r"role 'robot'.*user_tag"),
    ({"messages": [U("a"), U("b")], "chosen": "a", "rejected": "b"}, r"turn 2 is 'user', expected 'assistant'"),
])
def test_bad_preference_rows(tmp_path, row, match):
    f = jsonl(tmp_path / "p.jsonl", [{"instruction": "ok", "chosen": "x", "rejected": "y"}, row])
    reg = registry(tmp_path / "reg.yaml", {"p": {"path": "p.jsonl", "format": "preference"}})
    with pytest.raises(DataError, match=match) as e:
        load_examples(["p"], kind="preference", registry_file=reg)
    assert str(e.value).startswith(f"{f}, line 2")


def test_bad_hh_transcripts(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    reg = registry(tmp_path / "reg.yaml", {"hh": {"path": "hh.jsonl", "format": "preference", "style": "hh"}})
    for row, match in [({**ok, "rejected": "\n\nHuman: a\n\nAssistant: "}, r"column 'rejected': empty response"),
                       ({**ok, "chosen": "just text"}, r"column 'chosen': is not an HH transcript"),
                       ({**ok, "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: more"},
                        r"must end with an assistant")]:
        f = jsonl(tmp_path / "hh.jsonl", [ok, row])
        with pytest.raises(DataError, match=match) as e:
            load_examples(["hh"], kind="preference", registry_file=reg)
        assert str(e.value).startswith(f"{f}, line 2")


def test_missing_file_unknown_name_wrong_format_and_bad_registry(tmp_path):
    reg = registry(tmp_path / "reg.yaml", {"gone": {"path": "nope.jsonl", "format": "text"}})
    with pytest.raises(DataError, match=r"nope.jsonl: file does not exist"):
        load_examples(["gone"], kind="text", registry_file=reg)
    with pytest.raises(DataError, match=r"no such file"):
        load_examples([str(tmp_path / "missing.jsonl")], kind="text")
    with pytest.raises(DataError, match=r"unknown dataset 'demo_stf'.*did you mean 'demo_sft'"):
        load_examples(["demo_stf"], kind="sft")
    f = jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "input": ""}])
    with pytest.raises(DataError, match=r"has format 'prompt', but SFT takes instruction or conversation datasets"):
        load_examples([f], kind="sft")
    with pytest.raises(DataError, match=r"but reward modelling takes preference"):
        load_examples(["demo_sft"], kind="preference")
    bad = registry(tmp_path / "bad.yaml", {"x": {"path": "p.jsonl", "format": "prompt", "colums": {}}})
    with pytest.raises(DataError, match=r"bad.yaml: dataset 'x': unknown key 'colums'; did you mean 'columns'"):
        load_registry(bad)
    bad = registry(tmp_path / "bad.yaml", {"x": {"path": "p.jsonl", "format": "prompt", "columns": {"promt": "q"}}})
    with pytest.raises(DataError, match=r"unknown column 'promt'"):
        load_registry(bad)
    bad = registry(tmp_path / "bad.yaml", {"x": {"path": "p.jsonl", "format": "sharegpt"}})
    with pytest.raises(DataError, match=r"'format' must be one of text, instruction"):
        load_registry(bad)
    (tmp_path / "odd.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"odd.jsonl, line 1: cannot tell the format"):
        load_examples([str(tmp_path / "odd.jsonl")], kind="sft")


def test_skip_invalid_reports_per_file_and_identical_pairs_always_skip(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "ok"}, {"instruction": "q", "output": ""},
                                     {"instruction": "q"}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "{broken\n")
    with pytest.warns(DataWarning,
                      match=r"skipped 3 invalid row\(s\) of 4 in .*a.jsonl \(first: .*line 2, column 'output'"):
        ex = load_examples([a], kind="sft", skip_invalid=True)
    assert [e["meta"]["row"] for e in ex] == [1]
    bad = jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no valid rows left .*1 invalid"):
        load_examples([bad], kind="sft", skip_invalid=True)
    p = jsonl(tmp_path / "p.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "a"},
                                     {"instruction": "q", "chosen": "a", "rejected": "b"}])
    with pytest.warns(DataWarning, match=r"skipped 1 row\(s\) of 2 .*identical"):
        ex = load_examples([p], kind="preference")
    assert [(e["chosen"], e["rejected"]) for e in ex] == [("a", "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert len(load_examples([p], kind="prompt")) == 2  # as prompts, both rows are fine
