"""Datasets by name: the registry, file and hub loading, and the formats.

Every dataset, whatever its columns, becomes a list of examples of one shape::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "chosen": str, "rejected": str, "text": str,
     "meta": {"dataset": name, "file": path, "row": n, ...extra columns}}

with only the keys the stage needs (``kind``):

- ``text``: ``text`` (format text);
- ``sft``: ``messages`` ending with an assistant turn (formats instruction, conversation);
- ``preference``: ``messages`` = the prompt (ending with a user turn), ``chosen`` and
  ``rejected`` = the two assistant replies (format preference);
- ``prompt``: ``messages`` ending with a user turn (formats prompt, instruction,
  conversation, preference: their prompt part).

A registry entry (``datasets_registry/registry.yaml``, or a user file merged over it)::

    my_data:
      source: file               # or hub
      path: data/my_data.jsonl   # file or folder, relative to the registry file
      # hub_id: org/name, subset: ..., split: train, data_files: ..., data_dir: ...
      splits: {test: data/my_test.jsonl}  # optional: other splits (hub split names for hub)
      format: instruction        # text | instruction | conversation | preference | prompt
      columns: {instruction: question, output: answer}  # our role -> your column
      tags: {role_tag: from, content_tag: value, user_tag: human, assistant_tag: gpt, system_tag: system}
      style: hh                  # preference only: chosen/rejected are Anthropic HH transcripts
      num_samples: 1000          # sample this many rows (seeded; repeats rows when larger)
      description: ...
      license: ...
      metric: demo_task          # kept as is for the stages

Column roles: text; instruction, input, output, system, history (alpaca); messages
(a list of messages: sharegpt ``from``/``value`` or OpenAI ``role``/``content``);
chosen, rejected. LLaMA-Factory's ``dataset_info.json`` is read as a registry too.
"""
from __future__ import annotations

from rlhf.errors import RlhfError, did_you_mean

import csv
import hashlib
import importlib
import json
import random
import re
import warnings
from pathlib import Path

FORMATS = ("text", "instruction", "conversation", "preference", "prompt")
KINDS = {
    "text": ("text",),
    "sft": ("instruction", "conversation"),
    "preference": ("preference",),
    "prompt": ("prompt", "instruction", "conversation", "preference"),
}
ROLES = ("text", "instruction", "input", "output", "system", "history", "messages", "chosen", "rejected")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
ENTRY_KEYS = ("source", "path", "hub_id", "subset", "split", "splits", "data_files", "data_dir", "format",
              "columns", "tags", "style", "num_samples", "description", "license", "metric")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Role names seen in the wild; `tags` in an entry adds to them.
ROLE_NAMES = {"human": "user", "user": "user", "prompter": "user", "gpt": "assistant", "assistant": "assistant",
              "bot": "assistant", "chatgpt": "assistant", "model": "assistant", "system": "system"}
# LLaMA-Factory column names -> ours.
LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
              "system": "system", "messages": "messages", "chosen": "chosen", "rejected": "rejected"}


class DataError(RlhfError, ValueError):
    """Bad data or registry; the message names the file, row and column, and what to do."""


class FormatError(DataError):
    """A dataset whose format the stage cannot use."""


class DataWarning(UserWarning):
    """Rows were skipped (invalid with skip_invalid=True, or chosen == rejected)."""


class _RowError(Exception):
    def __init__(self, column: str | None, message: str):
        super().__init__(message)
        self.column, self.message = column, message


def builtin_registry_file() -> Path:
    return Path(importlib.import_module("rlhf.datasets_registry").__file__).parent / "registry.yaml"


# ---------------------------------------------------------------------------
# The registry


def load_registry(registry_file: str | None = None) -> dict[str, dict]:
    """The built-in registry with ``registry_file`` (YAML/JSON or LLaMA-Factory's dataset_info.json) merged over it."""
    registry = _read_registry(builtin_registry_file())
    if registry_file:
        registry.update(_read_registry(Path(registry_file)))
    return registry


def _read_registry(path: Path) -> dict[str, dict]:
    import yaml

    if not path.is_file():
        raise DataError(f"registry file {path} does not exist; give the path of a YAML/JSON registry file")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of dataset name -> entry at the top level")
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: dataset '{name}': expected a mapping of keys (source, path, format, ...)")
        lf = "format" not in entry and any(k in entry for k in ("file_name", "hf_hub_url", "ms_hub_url", "script_url",
                                                                "formatting", "ranking"))
        out[str(name)] = _from_llamafactory(name, entry, path) if lf else _check_entry(name, entry, path)
    return out


def _check_entry(name: str, entry: dict, reg: Path) -> dict:
    where = f"{reg}: dataset '{name}'"
    for key in entry:
        if key not in ENTRY_KEYS:
            raise DataError(f"{where}: unknown key '{key}'{_nearest(key, ENTRY_KEYS)}")
    e = dict(entry)
    if e.get("format") not in FORMATS:
        raise DataError(f"{where}: 'format' must be one of {', '.join(FORMATS)}, got {e.get('format')!r}")
    e.setdefault("source", "hub" if "hub_id" in e and "path" not in e else "file")
    if e["source"] == "file":
        if not e.get("path"):
            raise DataError(f"{where}: a file source needs 'path' (relative to the registry file)")
        e["path"] = str(reg.parent / e["path"])
        e["splits"] = {k: str(reg.parent / v) for k, v in (e.get("splits") or {}).items()}
    elif e["source"] == "hub":
        if not e.get("hub_id"):
            raise DataError(f"{where}: a hub source needs 'hub_id' (e.g. tatsu-lab/alpaca)")
    else:
        raise DataError(f"{where}: 'source' must be file or hub, got {e['source']!r}")
    for key, valid in (("columns", ROLES), ("tags", TAG_KEYS)):
        if not isinstance(e.get(key) or {}, dict):
            raise DataError(f"{where}: '{key}' must be a mapping")
        for k in e.get(key) or {}:
            if k not in valid:
                raise DataError(f"{where}: unknown {key[:-1]} '{k}' in '{key}'{_nearest(k, valid)}")
    if e.get("style") not in (None, "hh"):
        raise DataError(f"{where}: 'style' can only be hh (Anthropic HH-RLHF transcripts), got {e['style']!r}")
    e["name"], e["registry"] = name, str(reg)
    return e


def _from_llamafactory(name: str, lf: dict, reg: Path) -> dict:
    """A LLaMA-Factory dataset_info.json entry -> ours."""
    where = f"{reg}: dataset '{name}'"
    e = {"name": name, "registry": str(reg), "description": f"LLaMA-Factory dataset '{name}' from {reg.name}"}
    if lf.get("hf_hub_url"):
        e.update(source="hub", hub_id=lf["hf_hub_url"])
        for k in ("subset", "split"):
            if lf.get(k):
                e[k] = lf[k]
        if lf.get("folder"):
            e["data_dir"] = lf["folder"]
    elif lf.get("file_name"):
        e.update(source="file", path=str(reg.parent / lf["file_name"]))
    else:
        raise DataError(f"{where}: rlhf reads LLaMA-Factory entries with 'file_name' or 'hf_hub_url' only "
                        "(ms_hub_url/script_url are not supported); download the data and give file_name")
    sharegpt = lf.get("formatting", "alpaca") == "sharegpt"
    if lf.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: 'formatting' must be alpaca or sharegpt, got {lf['formatting']!r}")
    cols = {}
    for k, v in (lf.get("columns") or {}).items():
        if k not in LF_COLUMNS:
            raise DataError(f"{where}: LLaMA-Factory column '{k}' is not supported by rlhf "
                            f"(supported: {', '.join(LF_COLUMNS)}); remove it from 'columns'")
        if v:
            cols[LF_COLUMNS[k]] = v
    if lf.get("ranking"):
        e["format"] = "preference"
        if sharegpt:
            cols.setdefault("messages", "conversations")
    elif sharegpt:
        e["format"] = "conversation"
        cols.setdefault("messages", "conversations")
    elif set(cols) == {"instruction"}:  # LLaMA-Factory's pre-training entries: columns: {prompt: text}
        e["format"], cols = "text", {"text": cols["instruction"]}
    else:
        e["format"] = "instruction"
    e["columns"] = cols
    if sharegpt:
        tags = {k: v for k, v in (lf.get("tags") or {}).items() if k in TAG_KEYS}
        tags.setdefault("role_tag", "from")
        tags.setdefault("content_tag", "value")
        e["tags"] = tags
    if lf.get("num_samples"):
        e["num_samples"] = int(lf["num_samples"])
    return e


def _nearest(word: str, valid) -> str:
    return did_you_mean(word, valid, cutoff=0.5, otherwise=f"; valid: {', '.join(valid)}")


def _entry(name: str, registry: dict, registry_file: str | None) -> dict:
    """A registry entry, or one made up for a plain file path."""
    if name in registry:
        return registry[name]
    p = Path(name)
    if p.exists():
        return {"name": name, "source": "file", "path": str(p), "format": None, "registry": None}
    looks_like_file = p.suffix in FILE_TYPES or "/" in name or "\\" in name
    if looks_like_file:
        raise DataError(f"dataset '{name}': no such file, and no registry entry of that name; check the path "
                        "(relative paths start from the current directory)")
    hint = did_you_mean(name, registry, n=3, cutoff=0.5)
    raise DataError(f"unknown dataset '{name}' (not in the built-in registry"
                    f"{' or ' + registry_file if registry_file else ''}, and not a file){hint}; "
                    "`rlhf datasets list` shows the names; you can also pass a file path (.jsonl/.json/.csv/.parquet) "
                    "or add an entry to your own registry file (registry_file).")


def held_out_split(total: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The one held-out split (``val_size``: a share < 1 or a count of ``total`` rows): (held-out, training) row
    indices, both in the order of one shuffle seeded with ``seed``. Callers check that both sides fit their use."""
    import random

    n = min(max(int(val_size if val_size >= 1 else round(val_size * total)), 0), total)
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:n], order[n:]


def check_names(cfg) -> None:
    """Before any model loads: every dataset a stage config names is registered or a file (else DataError)."""
    names = [*getattr(cfg, "dataset", []), *getattr(cfg, "eval_dataset", [])]
    registry_file = getattr(cfg, "registry_file", None)
    registry = load_registry(registry_file) if names else {}
    for name in names:
        _entry(name, registry, registry_file)


# ---------------------------------------------------------------------------
# Reading rows


def _where(file: str, row: int | None, column: str | None = None) -> str:
    s = file
    if row is not None:
        s += f", {'line' if file.endswith('.jsonl') else 'row'} {row}"
    if column:
        s += f", column '{column}'"
    return s


def _split_source(entry: dict, split: str) -> str:
    """The file path (file source) or hub split name for ``split``."""
    splits = entry.get("splits") or {}
    if split in splits:
        return splits[split]
    if split == "train":
        return entry["path"] if entry["source"] == "file" else entry.get("split", "train")
    if entry.get("registry") is None:  # a plain file path is its own split
        return entry["path"]
    raise DataError(f"dataset '{entry['name']}' has no split '{split}' (it has: {', '.join(['train', *splits])}); "
                    f"add it under 'splits:' in its registry entry ({entry['registry']}) or name an eval dataset")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_TYPES)
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(FILE_TYPES)} files")
        return files
    if not path.exists():
        raise DataError(f"{path}: file does not exist; check the registry entry's path or the file name")
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_TYPES)}")
    return [path]


def _read_rows(path: Path):
    """Yield (row number, dict or _RowError) for one file."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON lines saved as .json (datasets' to_json does this)
                yield from _jsonl_rows(path)
                return
            raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}; "
                            "fix the file or save it as JSON lines (.jsonl)") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, row in enumerate(data, 1):
            yield i, row if isinstance(row, dict) else _RowError(None, f"expected an object, got {type(row).__name__}")
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), 1):
                yield i, {k: _csv_cell(v) for k, v in row.items()}
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
    elif path.suffix == ".txt":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                yield i, {"text": line}


def _csv_cell(value):
    """CSV cells that hold a JSON list of objects or pairs (messages, history) are decoded."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(v, list) and v and all(isinstance(x, (dict, list)) for x in v):
            return v
    return value


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _RowError(None, f"not valid JSON ({e.msg} at column {e.colno}); fix or delete the line")
                continue
            yield i, row if isinstance(row, dict) else _RowError(None,
                                                                 f"expected a JSON object, got {type(row).__name__}")


def _hub_rows(entry: dict, split: str):
    hub_id = entry["hub_id"]
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, entry.get("subset"), split=split,
                                   data_files=entry.get("data_files"), data_dir=entry.get("data_dir"))
    except Exception as e:  # offline, unknown id, bad split: all end here
        raise DataError(
            f"dataset '{entry['name']}': could not load '{hub_id}' (split '{split}') from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:300]}). If the hub cannot be reached from here, download the data "
            "where it can (e.g. datasets.load_dataset(...).to_json('data.jsonl')) and point at the local file: "
            "pass its path as the dataset, or give it a registry entry with `source: file` and `path:`") from None
    for i, row in enumerate(ds, 1):
        yield i, row


# ---------------------------------------------------------------------------
# Formats: one row -> one example


def _infer_format(row: dict) -> tuple[str, dict, str | None]:
    """(format, columns, style) guessed from a plain file's columns."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        hh = isinstance(row["chosen"], str) and row["chosen"].lstrip().startswith("Human:")
        plain = not keys & {"instruction", "prompt", "messages", "conversations"}
        return "preference", {}, "hh" if hh and plain else None
    if keys & {"conversations", "messages"}:
        return "conversation", {}, None
    if "instruction" in keys or "prompt" in keys:  # both read by default, as are output and input
        for out in ("output", "response", "completion"):
            if out in keys:
                return "instruction", {} if out == "output" else {"output": out}, None
        return "prompt", {}, None
    if "text" in keys:
        return "text", {}, None
    raise DataError(f"cannot tell the format from the columns {sorted(keys)}: expected text; instruction/output; "
                    "conversations or messages; chosen/rejected; or instruction/prompt alone. "
                    "Give the file a registry entry with format and columns")


class _Row:
    """One row and the entry's column map; records which columns were used."""

    def __init__(self, row: dict, entry: dict, fmt: str):
        self.row, self.fmt = row, fmt
        self.columns = entry.get("columns") or {}
        self.tags = entry.get("tags") or {}
        self.style = entry.get("style")
        self.used: set[str] = set()

    def col(self, role: str, *defaults: str) -> str | None:
        """Column name for ``role``: the mapped one, else the first default present in the row."""
        if role in self.columns:
            return self.columns[role]
        for d in defaults or (role,):
            if d in self.row:
                return d
        return None

    def get(self, role: str, *defaults: str, required: bool = False):
        name = self.col(role, *defaults)
        if name is not None:
            self.used.add(name)
        if name is None or name not in self.row:
            if required:
                shown = name or (defaults or (role,))[0]
                raise _RowError(shown, f"missing column '{shown}' (format {self.fmt} needs it for '{role}'; "
                                       f"the row has {', '.join(sorted(self.row))}). Map your column with "
                                       f"`columns: {{{role}: your_column}}` in the registry entry")
            return None
        return self.row[name]

    def text(self, role: str, *defaults: str, required: bool = False, what: str = "") -> str:
        v = self.get(role, *defaults, required=required)
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise _RowError(self.col(role, *defaults), f"expected text, got {type(v).__name__}")
        if required and not v.strip():
            raise _RowError(self.col(role, *defaults), f"empty {what or role}; fill it in or drop the row "
                                                       "(skip_invalid_rows: true skips such rows)")
        return v

    def extras(self) -> dict:
        return {k: v for k, v in self.row.items() if k not in self.used}


def _parse_messages(value, column: str, tags: dict) -> list[dict]:
    """sharegpt (from/value) or OpenAI (role/content) messages -> ours."""
    if not isinstance(value, list):
        raise _RowError(column, f"expected a list of messages, got {type(value).__name__}")
    roles = dict(ROLE_NAMES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
        if tags.get(tag):
            roles[tags[tag]] = role
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _RowError(column, f"message {i} is a {type(m).__name__}, expected an object")
        rk = tags.get("role_tag") or ("from" if "from" in m else "role")
        ck = tags.get("content_tag") or ("value" if "value" in m else "content")
        if rk not in m or ck not in m:
            raise _RowError(column, f"message {i} lacks '{rk}' or '{ck}' (it has {', '.join(m)}); set "
                                    "tags: {role_tag: ..., content_tag: ...} in the registry entry")
        role = roles.get(m[rk])
        if role is None:
            raise _RowError(column, f"message {i} has role '{m[rk]}', which rlhf does not know; map it with "
                                    "tags: {user_tag: ..., assistant_tag: ..., system_tag: ...}")
        content = m[ck]
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _RowError(column, f"message {i} has non-text content parts; only text is supported")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise _RowError(column, f"message {i} content is {type(content).__name__}, expected text")
        out.append({"role": role, "content": content})
    return out


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def _parse_hh(value, column: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    if not isinstance(value, str):
        raise _RowError(column, f"expected an HH transcript string, got {type(value).__name__}")
    parts = _HH_TURN.split(value)
    if len(parts) < 3 or parts[0].strip():
        raise _RowError(column, "is not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def _check_turns(messages: list[dict], column: str | None, end: str):
    """System first (optional), then user/assistant alternating, ending with ``end``; no empty turns."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise _RowError(column, "has no user message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _RowError(column, f"turn {i + 1} is '{m['role']}', expected '{want}' (after an optional system "
                                    "message, turns must alternate user/assistant starting with user)")
        if not m["content"].strip():
            raise _RowError(column, f"empty {'response' if want == 'assistant' else 'prompt'} in turn {i + 1}; "
                                    "fill it in or drop the row (skip_invalid_rows: true skips such rows)")
    if body[-1]["role"] != end:
        raise _RowError(column, f"must end with a{'n assistant' if end == 'assistant' else ' user'} turn, "
                                f"ends with '{body[-1]['role']}'")


def _prompt_messages(r: _Row) -> tuple[list[dict], str | None]:
    """The prompt of a row: its messages column, else system + history + instruction/input (alpaca).

    The instruction format reads a messages column only when the entry maps one.
    """
    mcol = r.col("messages", "conversations", "messages")
    if mcol is not None and (r.fmt != "instruction" or "messages" in r.columns):
        msgs = _parse_messages(r.get("messages", "conversations", "messages", required=True), mcol, r.tags)
    else:
        icol = r.col("instruction", "instruction", "prompt") or "instruction"
        ins = r.get("instruction", "instruction", "prompt", required=True)
        if isinstance(ins, list):  # TRL's conversational prompt column
            msgs = _parse_messages(ins, icol, r.tags)
        else:
            ins = r.text("instruction", "instruction", "prompt", required=True, what="instruction")
            query = r.text("input")
            msgs = []
            history = r.get("history") or []
            if not isinstance(history, list):
                raise _RowError(r.col("history"),
                                f"expected a list of [user, assistant] pairs, got {type(history).__name__}")
            for k, pair in enumerate(history, 1):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                    raise _RowError(r.col("history"), f"history item {k} must be a [user, assistant] pair of strings")
                msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            msgs.append({"role": "user", "content": f"{ins}\n{query}" if query.strip() else ins})
            mcol = icol
    system = r.text("system")
    if system.strip() and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, mcol


def _reply(value, column: str, tags: dict) -> str | list[dict]:
    """A chosen/rejected cell: a string, one message (dict), or a list of messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # LLaMA-Factory's sharegpt ranking: one message
        m = _parse_messages([value], column, tags)[0]
        if m["role"] != "assistant":
            raise _RowError(column, f"the reply's role is '{m['role']}', expected the assistant's")
        return m["content"]
    if isinstance(value, list):
        return _parse_messages(value, column, tags)
    raise _RowError(column, f"expected text or messages, got {type(value).__name__}")


def _preference(r: _Row) -> tuple[list[dict], str, str]:
    ccol, rcol = r.col("chosen"), r.col("rejected")
    chosen, rejected = r.get("chosen", required=True), r.get("rejected", required=True)
    if r.style == "hh":
        chosen, rejected = _parse_hh(chosen, ccol), _parse_hh(rejected, rcol)
    else:
        chosen, rejected = _reply(chosen, ccol, r.tags), _reply(rejected, rcol, r.tags)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise _RowError(rcol, "chosen and rejected must both be text or both be messages")
    if isinstance(chosen, list):
        if chosen and chosen[0]["role"] == "assistant":  # replies only: the prompt is in other columns
            prompt, _ = _prompt_messages(r)
            chosen, rejected = prompt + chosen, prompt + rejected
        for col, conv in ((ccol, chosen), (rcol, rejected)):
            _check_turns(conv, col, end="assistant")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if chosen == rejected:
            n = len(chosen) - 1
        elif len(chosen) != n + 1 or len(rejected) != n + 1:
            raise _RowError(ccol, "chosen and rejected conversations must be the same up to the final assistant "
                                  f"reply (they share {n} messages, then have {len(chosen) - n} and "
                                  f"{len(rejected) - n} more)")
        return chosen[:n], chosen[n]["content"], rejected[n]["content"]
    prompt, pcol = _prompt_messages(r)
    _check_turns(prompt, pcol, end="user")
    for col, text in ((ccol, chosen), (rcol, rejected)):
        if not text.strip():
            raise _RowError(col, f"empty {col}; fill it in or drop the row (skip_invalid_rows: true skips such rows)")
    return prompt, chosen, rejected


def _convert(r: _Row, kind: str) -> dict:
    """One row -> one example for ``kind``; raises _RowError."""
    fmt = r.fmt
    if fmt == "text":
        return {"text": r.text("text", required=True, what="text")}
    if fmt == "preference":
        prompt, chosen, rejected = _preference(r)
        return {"messages": prompt} if kind == "prompt" else {"messages": prompt, "chosen": chosen,
                                                              "rejected": rejected}
    if fmt == "conversation":
        mcol = r.col("messages", "conversations", "messages") or "conversations"
        msgs = _parse_messages(r.get("messages", "conversations", "messages", required=True), mcol, r.tags)
        system = r.text("system")
        if system.strip() and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": system})
        if kind == "prompt" and msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        _check_turns(msgs, mcol, end="user" if kind == "prompt" else "assistant")
        return {"messages": msgs}
    msgs, pcol = _prompt_messages(r)  # instruction and prompt formats
    if kind == "prompt":
        _check_turns(msgs, pcol, end="user")
        return {"messages": msgs}
    out = r.text("output", required=True, what="response")
    msgs.append({"role": "assistant", "content": out})
    _check_turns(msgs, pcol, end="assistant")
    return {"messages": msgs}


# ---------------------------------------------------------------------------
# Loading


def load_examples(names: list[str], *, kind: str, registry_file: str | None = None, num_samples: int | None = None,
                  skip_invalid: bool = False, split: str = "train", seed: int = 42) -> list[dict]:
    """Examples of ``kind`` (text, sft, preference, prompt) from registry names or file paths, concatenated.

    ``num_samples`` keeps the first N valid examples of each dataset. ``split`` picks a split of a registry
    entry (``train``, or a key of its ``splits``). ``seed`` drives an entry's own ``num_samples`` sampling.
    Invalid rows raise DataError, or with ``skip_invalid`` are skipped with a DataWarning per file (DataError
    if none is left). Preference rows with chosen == rejected are always skipped with a warning.
    """
    if kind not in KINDS:
        raise DataError(f"unknown kind '{kind}'; use one of {', '.join(KINDS)}")
    if isinstance(names, str):
        names = [names]
    if not names:
        raise DataError("no dataset given; name one with `dataset:` (`rlhf datasets list` shows the names)")
    registry = load_registry(registry_file)
    out = []
    for name in names:
        entry = _entry(name, registry, registry_file)
        out += _load_one(entry, kind, _split_source(entry, split), num_samples, skip_invalid, seed)
    return out


def _sources(entry: dict, where: str):
    """(display name, row iterator) per file of the entry (or the hub split)."""
    if entry["source"] == "hub":
        label = f"hub:{entry['hub_id']}" + (f"/{entry['subset']}" if entry.get("subset") else "") + f"[{where}]"
        return [(label, _hub_rows(entry, where))]
    return [(str(p), _read_rows(p)) for p in _files(Path(where))]


def _load_one(entry: dict, kind: str, where: str, num_samples, skip_invalid, seed) -> list[dict]:
    name = entry["name"]
    out, notes = [], []
    bad = same = total = 0
    first_bad = None
    if entry.get("format") is not None:
        _check_kind(entry, kind)
    for label, rows in _sources(entry, where):
        if entry.get("num_samples"):  # LLaMA-Factory style sampling: seeded, repeats rows to reach N
            rows = list(rows)
            rng = random.Random(seed)
            idx = rng.sample(range(len(rows)), min(entry["num_samples"], len(rows)))
            idx += [rng.randrange(len(rows)) for _ in range(entry["num_samples"] - len(idx))] if rows else []
            rows = [rows[i] for i in idx]
        file_bad = file_same = file_total = 0
        for row_no, row in rows:
            if num_samples is not None and len(out) >= num_samples:
                break
            file_total += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                if entry.get("format") is None:  # a plain file: the format comes from its first good row
                    try:
                        fmt, cols, style = _infer_format(row)
                    except DataError as e:
                        raise DataError(f"{_where(label, row_no)}: {e}") from None
                    entry = {**entry, "format": fmt, "columns": cols, "style": style}
                    _check_kind(entry, kind)
                r = _Row(row, entry, entry["format"])
                ex = _convert(r, kind)
            except _RowError as e:
                msg = f"{_where(label, row_no, e.column)}: {e.message}"
                if not skip_invalid:
                    raise DataError(msg) from None
                file_bad += 1
                first_bad = first_bad or msg
                continue
            if "chosen" in ex and ex["chosen"] == ex["rejected"]:
                file_same += 1
                continue
            ex["meta"] = {"dataset": name, "file": label, "row": row_no, **r.extras()}
            out.append(ex)
        if file_bad:
            notes.append(f"skipped {file_bad} invalid row(s) of {file_total} in {label} (first: {first_bad})")
        if file_same:
            notes.append(f"skipped {file_same} row(s) of {file_total} in {label} whose chosen and rejected "
                         "replies are identical")
        bad, same, total = bad + file_bad, same + file_same, total + file_total
        if num_samples is not None and len(out) >= num_samples:
            break
    for note in notes:
        warnings.warn(f"dataset '{name}': {note}", DataWarning, stacklevel=3)
    if not out and num_samples != 0:
        if total == 0:
            raise DataError(f"dataset '{name}': {where} holds no rows")
        raise DataError(f"dataset '{name}': no valid rows left in {where} ({bad} invalid, {same} with chosen == "
                        f"rejected, of {total}){'; first problem: ' + first_bad if first_bad else ''}")
    return out


def _check_kind(entry: dict, kind: str):
    if entry["format"] not in KINDS[kind]:
        stage = {"text": "pre-training", "sft": "SFT", "preference": "reward modelling",
                 "prompt": "PPO (prompts)"}[kind]
        raise FormatError(f"dataset '{entry['name']}' has format '{entry['format']}', but {stage} takes "
                        f"{' or '.join(KINDS[kind])} datasets; choose another dataset (`rlhf datasets list` shows "
                        "formats)")


# ---------------------------------------------------------------------------
# For the CLI and the manifests


def list_datasets(registry_file: str | None = None) -> list[tuple[str, str, str]]:
    """(name, format, description) for every registry entry."""
    return [(n, e["format"], e.get("description", "")) for n, e in load_registry(registry_file).items()]


def describe(name: str, registry_file: str | None = None) -> str:
    """What `rlhf datasets show NAME` prints: format, source, columns, license, description, first 3 rows."""
    registry = load_registry(registry_file)
    e = _entry(name, registry, registry_file)
    lines = [f"name:        {name}"]
    if e["source"] == "hub":
        subset = f" (subset {e['subset']})" if e.get("subset") else ""
        src = f"hub {e['hub_id']}{subset}, split {e.get('split', 'train')}"
        if e.get("data_files"):
            src += f", data_files {e['data_files']}"
    else:
        src = f"file {e['path']}"
    fmt = e["format"]
    rows = []
    if e["source"] == "file":
        try:
            for _, row in _read_rows(_files(Path(e["path"]))[0]):
                if not isinstance(row, _RowError):
                    rows.append(row)
                if len(rows) == 3:
                    break
        except DataError as err:
            rows.append(f"(cannot read: {err})")
        if fmt is None and rows and isinstance(rows[0], dict):
            fmt = _infer_format(rows[0])[0] + " (inferred from the columns)"
    lines += [f"format:      {fmt}" + (f", style {e['style']}" if e.get("style") else ""), f"source:      {src}"]
    if e.get("splits"):
        lines.append("splits:      " + ", ".join(f"{k}: {v}" for k, v in e["splits"].items()))
    if e.get("columns"):
        lines.append("columns:     " + ", ".join(f"{k} <- {v}" for k, v in e["columns"].items()))
    if e.get("tags"):
        lines.append("tags:        " + ", ".join(f"{k}={v}" for k, v in e["tags"].items()))
    for key in ("license", "metric", "description", "registry"):
        if e.get(key):
            lines.append(f"{key + ':':<12} {e[key]}")
    if rows:
        lines.append("first rows:")
        for row in rows:
            s = json.dumps(row, ensure_ascii=False) if isinstance(row, dict) else str(row)
            lines.append("  " + (s if len(s) <= 300 else s[:297] + "..."))
    return "\n".join(lines)


def fingerprint(names: list[str], registry_file: str | None = None) -> dict[str, str]:
    """name -> sha256 of the file bytes (files of a folder in order), or ``hub_id[:subset]@split`` for the hub."""
    if isinstance(names, str):
        names = [names]
    registry = load_registry(registry_file)
    out = {}
    for name in names:
        e = _entry(name, registry, registry_file)
        if e["source"] == "hub":
            out[name] = e["hub_id"] + (f":{e['subset']}" if e.get("subset") else "") + f"@{e.get('split', 'train')}"
            continue
        h = hashlib.sha256()
        for p in _files(Path(e["path"])):
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        out[name] = h.hexdigest()
    return out
