"""`rlhf chat`, `rlhf generate`, `rlhf eval` and `rlhf score` on a stage folder.

The folder opens as the model it stands for (rlhf/stage_folder.py); text is rendered with its own tokenizer and
chat template, and generation stops on eos or the template's end-of-turn token. The metrics are
rlhf/evaluate.py's; here are the options, the files read and written, the table and the chat loop.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from rlhf.stage_folder import POLICIES, Stage, load_reward_model, load_stage, open_stage  # light: no torch


def setup_logging(level: str = "info") -> None:
    """rlhf's log lines at ``level`` (stderr); transformers' load reports and progress bars off: the score head
    a reward model's base "misses" comes from the adapter, and the output should be the table or the chat."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from rlhf.logging_utils import setup_logging as base_setup

    base_setup(getattr(logging, level.upper()))
    logging.getLogger("rlhf").setLevel(getattr(logging, level.upper()))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)


trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True,
    help="Run the base model's own Python code (auto_map in its config.json), if you trust it; a stage folder never "
         "turns this on.")


base_option = click.option(
    "--base", default=None,
    help="The base model the folder was trained on, when it has moved (a folder or hub id; it must have the "
         "fingerprint recorded in the manifest) [default: the manifest's].")


def generation_options(f):
    """Sampling settings shared by chat, generate and eval."""
    opts = [
        click.option("--max-new-tokens", type=int, default=None,
                     help="Longest reply in tokens [default: chat 256; generate/eval the stage's max_new_tokens, "
                     "else 256; a default is at most half the model's context]."),
        click.option("--temperature", type=float, default=None,
                     help="Sampling temperature; 0 is greedy decoding [default: chat 0.7, generate/eval 0]."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (1.0: off)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k sampling (0: off)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling."),
        click.option("--quantization", type=click.Choice(["stage", "none", "4bit", "8bit"]), default="stage",
                     show_default=True,
                     help="Load the base as the stage trained (stage), or unquantized / 4-bit / 8-bit."),
        trust_remote_code_option,
        base_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _sampling(temperature: float, top_p: float, top_k: int) -> dict:
    if temperature < 0:
        raise click.BadParameter(f"must be >= 0 (0 is greedy), got {temperature}", param_hint="--temperature")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}


# ---------------------------------------------------------------------------------------------------------------
# chat


HELP = "/reset clears the history, /system TEXT sets the system prompt (and resets), /exit quits (or Ctrl-D)"


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], list[dict]]:
    """Prompt ids (generation prompt added) of the conversation and the messages kept: the oldest exchanges
    go (never the system prompt or the last user turn) until it fits ``budget`` tokens."""
    from rlhf.data import DataError
    from rlhf.templates import encode_prompt

    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    while (ids := encode_prompt(tokenizer, head + body, budget)) is None:
        if len(body) <= 1:
            raise DataError(f"that message alone is longer than the {budget} tokens a prompt may take; write a "
                             "shorter one, or make room (--max-length up to the model's context, --max-new-tokens)")
        body = body[next((i for i in range(1, len(body)) if body[i]["role"] == "user"), len(body) - 1):]
    return ids, head + body


def chat_loop(model, tokenizer, *, system: str | None, max_new_tokens: int, max_length: int, sampling: dict) -> None:
    """Read a line, stream the reply, keep the history; /reset, /system, /exit."""
    import torch
    from transformers import TextStreamer

    from rlhf.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass

    def fresh():
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = fresh()
            click.echo("(history cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            messages = fresh()
            click.echo(f"(system prompt {'set' if system else 'removed'}; history cleared)")
            continue
        if text.startswith("/"):
            click.echo(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids, kept = fit_history(tokenizer, messages, max_length - max_new_tokens)
        except ValueError as e:
            messages.pop()
            click.echo(f"({e})")
            continue
        if len(kept) < len(messages):
            click.echo(f"(the oldest {len(messages) - len(kept)} messages no longer fit the context of {max_length} "
                       "tokens and were dropped)")
            messages = kept
        click.echo("bot> ", nl=False)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        x = torch.tensor([ids], device=device)
        try:
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=streamer,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        except KeyboardInterrupt:
            click.echo("\n(interrupted; that reply is not kept)")
            messages.pop()
            continue
        new = out[0, len(ids):].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        messages.append({"role": "assistant", "content": tokenizer.decode(new[:cut], skip_special_tokens=True)})


@click.command("chat")
@click.argument("folder")
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--max-length", type=int, default=None,
              help="Context in tokens (prompt + reply); older turns are dropped to fit [default: the model's].")
@generation_options
def chat(folder, system, max_length, max_new_tokens, temperature, top_p, top_k, seed, quantization, trust_remote_code,
         base):
    """Chat in the terminal with an SFT or PPO folder (its chat template, streamed replies, multi-turn).

    Commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits.
    """
    import torch

    from rlhf.config import ConfigError
    from rlhf.evaluate import context_length, fit_context

    setup_logging("warning")  # the terminal is for the conversation
    sampling = _sampling(0.7 if temperature is None else temperature, top_p, top_k)
    st = open_stage(folder, POLICIES, "rlhf chat", base)
    model, tokenizer = load_stage(st, quantization=quantization, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    context = context_length(model)
    if max_length and max_length > context:
        raise ConfigError(f"--max-length {max_length} exceeds the model's context of {context} tokens (its "
                          "max_position_embeddings); give at most that")
    # a reply of --max-new-tokens, by default 256 but at most half the context; the history gets the rest
    max_new_tokens, _ = fit_context(max_length or context, max_new_tokens, None)
    max_length = max_length or context
    click.echo(f"rlhf chat: {folder} ({st.stage}, base {st.base}). {HELP}.")
    chat_loop(model, tokenizer, system=system, max_new_tokens=max_new_tokens, max_length=max_length, sampling=sampling)


# ---------------------------------------------------------------------------------------------------------------
# generate


def _read_jsonl(path: str) -> dict[int, dict]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rows[i] = json.loads(line)
    return rows


def _write_jsonl(path: str, rows) -> None:
    """Write ``rows`` as JSON lines to ``path`` through a temporary file: a killed run leaves no half-written output."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate_file(st: Stage, input_path: str, output_path: str, *, batch_size: int = 8,
                  max_new_tokens: int | None = None,
                  max_length: int | None = None, sampling: dict | None = None, quantization: str = "stage",
                  trust_remote_code: bool = False,
                  progress: bool = True) -> int:
    """Replies to every prompt row of a JSONL file; writes each row with `response` added. Returns the count."""
    from rlhf.data import DataError, load_examples
    from rlhf.evaluate import encode_prompts, generate_all

    if not Path(input_path).is_file():
        raise DataError(f"--input {input_path} does not exist")
    if Path(input_path).suffix != ".jsonl":
        raise DataError(f"--input {input_path}: expected a .jsonl file (one JSON object per line)")
    examples = load_examples([input_path], kind="prompt")  # bad rows stop here, naming file and line
    rows = _read_jsonl(input_path)
    from rlhf.evaluate import context_length, fit_context

    model, tokenizer = load_stage(st, quantization=quantization, trust_remote_code=trust_remote_code)
    # reply and prompt fit the model's context together (defaults are capped; values given that cannot fit: one line)
    max_new_tokens, limit = fit_context(context_length(model), max_new_tokens, max_length, default_new=int(
        st.config.get("max_new_tokens") or 256), default_prompt=int(
        st.config.get("max_prompt_length") or st.config.get("max_length") or 1024))
    prompts, too_long = encode_prompts(tokenizer, examples, limit, input_path)
    if too_long:
        where = ", ".join(str(examples[i]["meta"]["row"]) for i in too_long[:5])
        raise DataError(f"{input_path}, line {where}: prompt longer than --max-length {limit} tokens (chat template "
                        f"applied; {len(too_long)} such rows); shorten them or raise --max-length")
    replies = generate_all(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           sampling=sampling or {"do_sample": False}, progress=progress)
    _write_jsonl(output_path, ({**rows[e["meta"]["row"]], "response": r} for e, r in zip(examples, replies)))
    return len(replies)


@click.command("generate")
@click.argument("folder")
@click.option("--input", "input_path", required=True,
              help="JSONL prompts: instruction (+input/system/history), prompt, or messages per row.")
@click.option("--output", "output_path", required=True, help="JSONL out: each input row with `response` added.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per batch.")
@click.option("--max-length", type=int, default=None,
              help="Longest prompt in tokens, template applied [default: the stage's max_prompt_length or max_length, "
                   "at most what the model's context leaves after the reply].")
@generation_options
def generate_cmd(folder, input_path, output_path, batch_size, max_length, max_new_tokens, temperature, top_p, top_k,
                 seed, quantization, trust_remote_code, base):
    """Batched generation with an SFT or PPO folder over a JSONL file of prompts."""
    import torch

    setup_logging()
    torch.manual_seed(seed)
    st = open_stage(folder, POLICIES, "rlhf generate", base)
    n = generate_file(st, input_path, output_path, batch_size=batch_size,
                      max_new_tokens=max_new_tokens,
                      max_length=max_length, sampling=_sampling(temperature or 0.0, top_p, top_k),
                      quantization=quantization, trust_remote_code=trust_remote_code)
    click.echo(f"wrote {n} replies -> {output_path}")


# ---------------------------------------------------------------------------------------------------------------
# eval


def format_table(result: dict) -> str:
    """One table: a row per metric, a column for the folder (and the baseline)."""
    cols = [("metric", None), (result["folder"], result["metrics"])]
    if result.get("baseline"):
        cols.append((result["baseline"]["folder"] + " (baseline)", result["baseline"]["metrics"]))
    keys = list(dict.fromkeys(k for _, m in cols[1:] for k in m))

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[c for c, _ in cols]] + [[k] + [cell(m.get(k)) for _, m in cols[1:]] for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    rm = f", rewards from {result['rm']}" if result.get("rm") else ""
    head = f"rlhf eval: {result['stage']} folder on {', '.join(result['datasets'])}{rm}"
    return head + "\n" + "\n".join(lines)


@click.command("eval")
@click.argument("folder")
@click.option("--dataset", "datasets", multiple=True,
              help="Registry name or file (repeatable) [default: the stage's eval_dataset].")
@click.option("--registry-file", default=None,
              help="Your registry file, merged over the built-in one [default: the stage's].")
@click.option("--num-samples", type=int, default=None, help="Use at most this many rows of each dataset.")
@click.option("--rm", "rm_dir", default=None, help="RM folder: score the policy's replies (mean reward).")
@click.option("--baseline", default=None,
              help="Another folder of the same kind, measured the same way (with --rm: win rate against it).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per forward/generation batch.")
@click.option("--max-length", type=int, default=None,
              help="Longest example in tokens [default: the stage's max_length].")
@click.option("--json-out", default=None, help="Also write the results as JSON to this file.")
@generation_options
def eval_cmd(folder, datasets, registry_file, num_samples, rm_dir, baseline, batch_size, max_length, json_out,
             max_new_tokens, temperature, top_p, top_k, seed, quantization, trust_remote_code, base):
    """Evaluate a stage folder on held-out data and print one table.

    SFT/PPO (and pt) folders: loss and perplexity on answered rows, the dataset's checkable metric (registry
    `metric:`), and with --rm the mean reward of greedy replies and the win rate against --baseline.
    RM folders: pairwise accuracy on preference pairs.
    """
    import torch

    from rlhf.evaluate import EvalSettings, evaluate_folder

    setup_logging()
    torch.manual_seed(seed)
    s = EvalSettings(list(datasets), registry_file, num_samples, max_new_tokens, max_length, batch_size,
                     _sampling(temperature or 0.0, top_p, top_k), quantization, trust_remote_code=trust_remote_code,
                     base=base)
    result = evaluate_folder(folder, s, rm=rm_dir, baseline=baseline)
    click.echo(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"json -> {json_out}")


# ---------------------------------------------------------------------------------------------------------------
# score


def score_file(rm_dir: str, input_path: str, output_path: str, max_length: int = 1024,
               trust_remote_code: bool = False, base: str | None = None) -> int:
    """Score each row of a JSONL file: prompt fields (instruction/input, prompt, or messages) + `response`.

    Writes the rows with a `score` key added; returns how many were scored.
    """
    from rlhf.data import DataError, load_examples
    from rlhf.scoring import score_pairs

    if not Path(input_path).is_file():
        raise DataError(f"{input_path} does not exist")
    examples = load_examples([input_path], kind="prompt")  # names the row of a bad line
    rows = _read_jsonl(input_path)
    for line, r in rows.items():
        if not isinstance(r.get("response"), str):
            raise DataError(f"{input_path}, line {line}: missing `response` (a string) to score")
    model, tokenizer = load_reward_model(rm_dir, trust_remote_code=trust_remote_code, base=base)
    scores = score_pairs(model, tokenizer, examples, [r["response"] for r in rows.values()], max_length)
    _write_jsonl(output_path, ({**r, "score": s} for r, s in zip(rows.values(), scores)))
    return len(rows)


@click.command("score")
@click.argument("rm_dir")
@click.option("--input", "input_path", required=True,
              help="JSONL rows: prompt (instruction/input, prompt or messages) and `response`.")
@click.option("--output", "output_path", required=True, help="Where to write the rows with a `score` key added.")
@click.option("--max-length", default=1024, show_default=True, help="Truncate prompt+response to this many tokens.")
@trust_remote_code_option
@base_option
def score(rm_dir, input_path, output_path, max_length, trust_remote_code, base):
    """Score (prompt, response) pairs from a file with a trained reward-model folder."""
    from rlhf.logging_utils import setup_logging

    setup_logging()
    n = score_file(rm_dir, input_path, output_path, max_length, trust_remote_code=trust_remote_code, base=base)
    click.echo(f"scored {n} rows -> {output_path}")
