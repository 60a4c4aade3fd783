"""Use what you trained: `rlhf chat`, `rlhf generate` and `rlhf eval` on a stage folder.

A stage folder opens as the model it stands for: an SFT or PPO folder is a policy (its LoRA adapter on the
base named in the manifest), an RM folder a scorer (its adapter and score head), a ``pt`` folder or a
full/freeze fine-tune holds whole weights. Text is rendered with the folder's own tokenizer and chat
template, and generation stops on eos or the template's end-of-turn token.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import click

POLICIES = ("pt", "sft", "ppo")  # folders that generate text
SCORERS = ("rm",)  # folders that score it


@dataclass
class Stage:
    """An opened stage folder: what it is and where its weights are."""

    folder: str
    stage: str  # pt, sft, rm, ppo
    manifest: dict
    base: str  # folder or hub id of the weights the adapter goes on (the folder itself when it has whole weights)
    adapter: str | None  # folder of the LoRA adapter, None for whole weights

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def head(self) -> str:
        return "score" if self.stage == "rm" else "lm"

    @property
    def quantization(self) -> str:
        return self.config.get("quantization") or "none"


def open_stage(folder: str, kinds: tuple[str, ...], command: str) -> Stage:
    """Check that ``folder`` is a finished stage output of one of ``kinds`` and say how to load it."""
    from rlhf.manifest import StageError, check_parent

    f = Path(folder)
    if f.is_dir() and not (f / "manifest.json").is_file() and (f / "config.json").is_file():
        raise StageError(f"{folder} is not a stage folder (no manifest.json) but a plain transformers model "
                         f"(an `rlhf export` output?): load it with transformers; {command} takes the stage folder "
                         f"it came from")
    m = check_parent(folder, POLICIES + SCORERS, for_stage=command)  # exists, finished, files present
    if m["stage"] not in kinds:
        if m["stage"] == "rm":
            raise StageError(f"{folder} is a reward model (`rlhf rm` output): it scores text, it does not write it; "
                             f"{command} needs a {'/'.join(kinds)} folder (score replies with `rlhf score` or "
                             f"`rlhf eval {folder}`)")
        raise StageError(f"{folder} is the output of `rlhf {m['stage']}`, but {command} needs a {'/'.join(kinds)} folder")
    lora = m["stage"] != "pt" and m.get("config", {}).get("finetuning_type", "lora") == "lora"
    return Stage(str(folder), m["stage"], m, m["base_model"]["path"] if lora else str(folder), str(folder) if lora else None)


def load_stage(st: Stage, *, quantization: str = "stage", dtype: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) of a stage folder in eval mode. quantization "stage": as the stage trained.
    Remote code runs only when the caller (the user's --trust-remote-code) says so, never from the manifest."""
    from rlhf.config import stage_model_config
    from rlhf.loader import AdapterSpec, load_model, load_tokenizer
    from rlhf.templates import apply_template

    # finetuning_type lora with no adapter is the plain model, which the loader may also quantize
    cfg = stage_model_config(st.config, trust_remote_code=trust_remote_code, model_name_or_path=st.base,
                             gradient_checkpointing=False, finetuning_type="lora")
    if quantization != "stage":
        cfg.quantization = quantization
    if dtype:
        cfg.dtype = dtype
    adapters = [AdapterSpec("default", folder=st.adapter)] if st.adapter else []
    model = load_model(cfg, head=st.head, adapters=adapters, for_training=False)
    tokenizer = load_tokenizer(st.folder, cfg.trust_remote_code)
    apply_template(tokenizer, "auto" if tokenizer.chat_template else st.config.get("template", "auto"))
    return model, tokenizer


def _release() -> None:
    """Give back the memory of a model the caller has deleted (the next one may need it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    help="Run the base model's own Python code (auto_map in its config.json), if you trust it; a stage folder never turns this on.")


def generation_options(f):
    """Sampling settings shared by chat, generate and eval."""
    opts = [
        click.option("--max-new-tokens", type=int, default=None, help="Longest reply in tokens [default: chat 256; generate/eval the stage's max_new_tokens, else 256]."),
        click.option("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy decoding [default: chat 0.7, generate/eval 0]."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (1.0: off)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k sampling (0: off)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling."),
        click.option("--quantization", type=click.Choice(["stage", "none", "4bit", "8bit"]), default="stage", show_default=True,
                     help="Load the base as the stage trained (stage), or unquantized / 4-bit / 8-bit."),
        trust_remote_code_option,
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
                             "shorter one, or raise --max-length")
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


def _context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return 2048


@click.command("chat")
@click.argument("folder")
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--max-length", type=int, default=None, help="Context in tokens (prompt + reply); older turns are dropped to fit [default: the model's].")
@generation_options
def chat(folder, system, max_length, max_new_tokens, temperature, top_p, top_k, seed, quantization, trust_remote_code):
    """Chat in the terminal with an SFT or PPO folder (its chat template, streamed replies, multi-turn).

    Commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits.
    """
    import torch

    setup_logging("warning")  # the terminal is for the conversation
    sampling = _sampling(0.7 if temperature is None else temperature, top_p, top_k)
    st = open_stage(folder, POLICIES, "rlhf chat")
    model, tokenizer = load_stage(st, quantization=quantization, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    max_new_tokens = max_new_tokens or 256
    max_length = max_length or _context_length(model)
    if max_new_tokens >= max_length:
        raise click.BadParameter(f"{max_new_tokens} leaves no room for the prompt in a context of {max_length} tokens",
                                 param_hint="--max-new-tokens")
    click.echo(f"rlhf chat: {folder} ({st.stage}, base {st.manifest['base_model']['path']}). {HELP}.")
    chat_loop(model, tokenizer, system=system, max_new_tokens=max_new_tokens, max_length=max_length, sampling=sampling)


# ---------------------------------------------------------------------------------------------------------------
# generate


def generate_all(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, sampling: dict,
                 desc: str = "generate", progress: bool = True) -> list[str]:
    """Replies to tokenized prompts, in order; batches of similar length (less padding), with a progress bar."""
    from tqdm.auto import tqdm

    from rlhf.evaluate import generate

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            replies = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, **sampling)
            for i, r in zip(idx, replies):
                out[i] = r
            bar.update(len(idx))
    return out


def encode_prompts(tokenizer, examples: list[dict], max_length: int, what: str) -> tuple[list[list[int]], list[int]]:
    """Prompt ids (generation prompt added) of ``examples`` and the indices of those longer than ``max_length``."""
    from rlhf.evaluate import prompt_messages
    from rlhf.templates import encode_prompt

    ids, too_long = [], []
    for i, e in enumerate(examples):
        p = encode_prompt(tokenizer, prompt_messages(e), max_length)
        if p is None:
            too_long.append(i)
        ids.append(p)
    if too_long and len(too_long) == len(examples):
        from rlhf.data import DataError

        raise DataError(f"{what}: every prompt is longer than {max_length} tokens (chat template applied); raise --max-length")
    return ids, too_long


def _read_jsonl(path: str) -> dict[int, dict]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rows[i] = json.loads(line)
    return rows


def generate_file(st: Stage, input_path: str, output_path: str, *, batch_size: int = 8, max_new_tokens: int = 256,
                  max_length: int | None = None, sampling: dict | None = None, quantization: str = "stage",
                  trust_remote_code: bool = False,
                  progress: bool = True) -> int:
    """Replies to every prompt row of a JSONL file; writes each row with `response` added. Returns the count."""
    from rlhf.data import DataError, load_examples

    if not Path(input_path).is_file():
        raise DataError(f"--input {input_path} does not exist")
    if Path(input_path).suffix != ".jsonl":
        raise DataError(f"--input {input_path}: expected a .jsonl file (one JSON object per line)")
    examples = load_examples([input_path], kind="prompt")  # bad rows stop here, naming file and line
    rows = _read_jsonl(input_path)
    model, tokenizer = load_stage(st, quantization=quantization, trust_remote_code=trust_remote_code)
    limit = max_length or int(st.config.get("max_prompt_length") or st.config.get("max_length") or 1024)
    prompts, too_long = encode_prompts(tokenizer, examples, limit, input_path)
    if too_long:
        where = ", ".join(str(examples[i]["meta"]["row"]) for i in too_long[:5])
        raise DataError(f"{input_path}, line {where}: prompt longer than --max-length {limit} tokens (chat template "
                        f"applied; {len(too_long)} such rows); shorten them or raise --max-length")
    replies = generate_all(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           sampling=sampling or {"do_sample": False}, progress=progress)
    tmp = Path(str(output_path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e, r in zip(examples, replies):
            f.write(json.dumps({**rows[e["meta"]["row"]], "response": r}, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return len(replies)


@click.command("generate")
@click.argument("folder")
@click.option("--input", "input_path", required=True, help="JSONL prompts: instruction (+input/system/history), prompt, or messages per row.")
@click.option("--output", "output_path", required=True, help="JSONL out: each input row with `response` added.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per batch.")
@click.option("--max-length", type=int, default=None, help="Longest prompt in tokens, template applied [default: the stage's max_prompt_length or max_length].")
@generation_options
def generate_cmd(folder, input_path, output_path, batch_size, max_length, max_new_tokens, temperature, top_p, top_k, seed,
                 quantization, trust_remote_code):
    """Batched generation with an SFT or PPO folder over a JSONL file of prompts."""
    import torch

    setup_logging()
    torch.manual_seed(seed)
    st = open_stage(folder, POLICIES, "rlhf generate")
    n = generate_file(st, input_path, output_path, batch_size=batch_size,
                      max_new_tokens=max_new_tokens or int(st.config.get("max_new_tokens") or 256),
                      max_length=max_length, sampling=_sampling(temperature or 0.0, top_p, top_k),
                      quantization=quantization, trust_remote_code=trust_remote_code)
    click.echo(f"wrote {n} replies -> {output_path}")


# ---------------------------------------------------------------------------------------------------------------
# eval


def _load_or_none(names, kind: str, **kw):
    """Examples of ``kind``, or None when the datasets' format cannot serve it (e.g. prompts have no answers)."""
    from rlhf.data import FormatError, load_examples

    try:
        return load_examples(names, kind=kind, **kw)
    except FormatError:
        return None


def lm_loss(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean negative log-likelihood per trained token (the assistant turns, as SFT trains) and the token count."""
    import torch

    from rlhf.templates import encode_sft

    rows = [r for e in examples if (r := encode_sft(tokenizer, e["messages"], max_length))]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            attn = torch.zeros_like(ids)
            for j, r in enumerate(batch):  # right padding
                n = len(r["input_ids"])
                ids[j, :n], labels[j, :n], attn[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            target = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    if not count:
        from rlhf.data import DataError

        raise DataError(f"no example keeps an assistant token within max_length={max_length}; raise --max-length")
    return total / count, count


def pairwise(chosen: list[float], rejected: list[float]) -> dict:
    """Reward-model accuracy (share of pairs with chosen scored above rejected; ties count as wrong) and margins."""
    n = len(chosen)
    return {"accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "margin_mean": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "score_chosen_mean": sum(chosen) / n, "score_rejected_mean": sum(rejected) / n}


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where reply a outscores reply b; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@dataclass
class EvalSettings:
    """What `rlhf eval` reads and how it generates (the command's options)."""

    datasets: list[str]
    registry_file: str | None = None
    num_samples: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    batch_size: int = 8
    sampling: dict = field(default_factory=lambda: {"do_sample": False})  # greedy
    quantization: str = "stage"
    progress: bool = True
    trust_remote_code: bool = False  # the user's --trust-remote-code


def _eval_rm(st: Stage, pairs: list[dict], s: EvalSettings) -> dict:
    from rlhf.stages.rm import score_pairs

    model, tok = load_stage(st, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    max_length = s.max_length or int(st.config.get("max_length") or 1024)
    chosen = score_pairs(model, tok, pairs, [e["chosen"] for e in pairs], max_length, s.batch_size)
    rejected = score_pairs(model, tok, pairs, [e["rejected"] for e in pairs], max_length, s.batch_size)
    del model
    _release()
    return {**pairwise(chosen, rejected), "pairs": len(pairs)}


def _eval_policy(st: Stage, sft_rows, prompt_rows, metric, replies_needed: bool, s: EvalSettings, max_new_tokens: int):
    """Loss/perplexity on answered rows; replies to the prompts when something scores them; the task metric.

    Returns (metrics, {prompt index: reply} or None)."""
    from rlhf.evaluate import metric_fn

    model, tok = load_stage(st, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    max_length = s.max_length or int(st.config.get("max_length") or 1024)
    out, replies = {}, None
    if sft_rows:
        loss, tokens = lm_loss(model, tok, sft_rows, max_length, s.batch_size)
        out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)), loss_tokens=tokens)
    if replies_needed:
        limit = int(st.config.get("max_prompt_length") or max_length)
        prompts, too_long = encode_prompts(tok, prompt_rows, limit, "eval prompts")
        keep = [i for i in range(len(prompts)) if prompts[i] is not None]
        got = generate_all(model, tok, [prompts[i] for i in keep], batch_size=s.batch_size, max_new_tokens=max_new_tokens,
                           sampling=s.sampling, desc=f"generate ({st.stage})", progress=s.progress)
        replies = dict(zip(keep, got))
        if too_long:
            out["prompts_too_long"] = len(too_long)
        if metric:
            out["task_metric"] = float(metric_fn(metric)([prompt_rows[i]["meta"] for i in keep], got))
            out["task_prompts"] = len(keep)
    del model
    _release()
    return out, replies


def _rewards(rm: Stage, prompt_rows: list[dict], replies: dict, s: EvalSettings) -> dict:
    """{prompt index: reward} of the replies under the reward model."""
    from rlhf.evaluate import prompt_messages
    from rlhf.stages.rm import score_pairs

    model, tok = load_stage(rm, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    idx = sorted(replies)
    vals = score_pairs(model, tok, [{"messages": prompt_messages(prompt_rows[i])} for i in idx], [replies[i] for i in idx],
                       int(rm.config.get("max_length") or 1024), s.batch_size)
    del model
    _release()
    return dict(zip(idx, vals))


def evaluate_folder(folder: str, s: EvalSettings, *, rm: str | None = None, baseline: str | None = None) -> dict:
    """Metrics of a stage folder on held-out data (and of a baseline folder of the same kind), as a dict.

    RM folder: pairwise accuracy on a preference dataset. Policy folder (pt/sft/ppo): loss and perplexity on
    answered rows (instruction/conversation datasets), the registry's checkable metric (``metric:``) on the
    replies, and with ``rm`` the mean reward of the replies and, with ``baseline``, the win rate against the
    baseline's replies to the same prompts.
    """
    from rlhf.data import DataError
    from rlhf.manifest import StageError
    from rlhf.train_utils import dataset_metric

    st = open_stage(folder, POLICIES + SCORERS, "rlhf eval")
    kinds = SCORERS if st.stage in SCORERS else POLICIES
    other = open_stage(baseline, kinds, "rlhf eval --baseline") if baseline else None
    scorer = open_stage(rm, SCORERS, "rlhf eval --rm") if rm else None
    names = s.datasets or list(st.config.get("eval_dataset") or [])
    if not names:
        raise DataError(f"rlhf eval: {folder} names no eval_dataset in its manifest; give --dataset NAME (a registry "
                        "name or a file)")
    registry = s.registry_file or st.config.get("registry_file")
    kw = dict(registry_file=registry, num_samples=s.num_samples)
    result = {"folder": str(folder), "stage": st.stage, "datasets": names, "rm": rm,
              "baseline": {"folder": str(baseline), "stage": other.stage} if other else None}

    if st.stage in SCORERS:
        if rm:
            raise StageError("rlhf eval: --rm scores a policy's replies, but the folder is a reward model itself")
        pairs = _load_or_none(names, "preference", **kw)
        if pairs is None:
            raise DataError(f"rlhf eval: a reward model is measured on preference pairs (chosen/rejected); "
                            f"{', '.join(names)} has none")
        result["metrics"] = _eval_rm(st, pairs, s)
        if other:
            result["baseline"]["metrics"] = _eval_rm(other, pairs, s)
        return result

    sft_rows = _load_or_none(names, "sft", **kw)
    prompt_rows = sft_rows if sft_rows is not None else _load_or_none(names, "prompt", **kw)
    if prompt_rows is None:
        raise DataError(f"rlhf eval: {', '.join(names)} has neither answers nor prompts to evaluate a policy on")
    metric = dataset_metric(names, registry)
    if not (sft_rows or metric or rm):
        raise DataError(f"rlhf eval: nothing to measure on {', '.join(names)}: it has no reference answers (for the "
                        "loss), no `metric:` in the registry, and no --rm was given to score replies")
    new_tokens = s.max_new_tokens or int(st.config.get("max_new_tokens") or 256)
    need = bool(metric or rm)
    result["metrics"], replies = _eval_policy(st, sft_rows, prompt_rows, metric, need, s, new_tokens)
    if other:
        result["baseline"]["metrics"], base_replies = _eval_policy(other, sft_rows, prompt_rows, metric, need, s, new_tokens)
    if scorer:
        mine = _rewards(scorer, prompt_rows, replies, s)
        result["metrics"]["reward_mean"] = sum(mine.values()) / len(mine)
        if other:
            theirs = _rewards(scorer, prompt_rows, base_replies, s)
            both = sorted(set(mine) & set(theirs))
            result["baseline"]["metrics"]["reward_mean"] = sum(theirs.values()) / len(theirs)
            result["metrics"]["win_rate"] = win_rate([mine[i] for i in both], [theirs[i] for i in both])
            result["baseline"]["metrics"]["win_rate"] = 1.0 - result["metrics"]["win_rate"]
    if need:
        result["generation"] = {"max_new_tokens": new_tokens, **s.sampling}
    return result


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
    head = f"rlhf eval: {result['stage']} folder on {', '.join(result['datasets'])}" + (f", rewards from {result['rm']}" if result.get("rm") else "")
    return head + "\n" + "\n".join(lines)


@click.command("eval")
@click.argument("folder")
@click.option("--dataset", "datasets", multiple=True, help="Registry name or file (repeatable) [default: the stage's eval_dataset].")
@click.option("--registry-file", default=None, help="Your registry file, merged over the built-in one [default: the stage's].")
@click.option("--num-samples", type=int, default=None, help="Use at most this many rows of each dataset.")
@click.option("--rm", "rm_dir", default=None, help="RM folder: score the policy's replies (mean reward).")
@click.option("--baseline", default=None, help="Another folder of the same kind, measured the same way (with --rm: win rate against it).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per forward/generation batch.")
@click.option("--max-length", type=int, default=None, help="Longest example in tokens [default: the stage's max_length].")
@click.option("--json-out", default=None, help="Also write the results as JSON to this file.")
@generation_options
def eval_cmd(folder, datasets, registry_file, num_samples, rm_dir, baseline, batch_size, max_length, json_out,
             max_new_tokens, temperature, top_p, top_k, seed, quantization, trust_remote_code):
    """Evaluate a stage folder on held-out data and print one table.

    SFT/PPO (and pt) folders: loss and perplexity on answered rows, the dataset's checkable metric (registry
    `metric:`), and with --rm the mean reward of greedy replies and the win rate against --baseline.
    RM folders: pairwise accuracy on preference pairs.
    """
    import torch

    setup_logging()
    torch.manual_seed(seed)
    s = EvalSettings(list(datasets), registry_file, num_samples, max_new_tokens, max_length, batch_size,
                     _sampling(temperature or 0.0, top_p, top_k), quantization, trust_remote_code=trust_remote_code)
    result = evaluate_folder(folder, s, rm=rm_dir, baseline=baseline)
    click.echo(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"json -> {json_out}")


COMMANDS = (chat, generate_cmd, eval_cmd)  # for rlhf.cli: cli.add_command(c) for each
