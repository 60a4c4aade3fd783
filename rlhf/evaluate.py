"""Evaluation: the checkable task metric on held-out prompts (in-run, by the stages), and a finished stage folder
measured on held-out data (`rlhf eval`): loss and perplexity, RM pairwise accuracy, reward and win rate; the
replies of `rlhf generate`. Generation itself is rlhf/generation.py; the command line is rlhf/cli/use.py."""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field

from rlhf.data import DataError
from rlhf.generation import generate_text, pad
from rlhf.stage_folder import POLICIES, SCORERS, Stage, load_stage, open_stage, release

# registry `metric:` name -> module with `task_metric(rows, responses) -> float` (correctness, the share of right
# responses) and, optionally, `metrics(rows, responses) -> {name: float}`: more numbers, task_metric among them (the
# demo's pref_metric: right and in the preferred layout)
METRICS = {"demo_task": "rlhf.demo_task", "arith_task": "rlhf.arith_task"}


def metrics_fn(name: str | None):
    """``(rows, responses) -> {name: value}``: every number of the registry metric ``name`` (``task_metric``
    among them), or None without a metric."""
    if not name:
        return None
    if name not in METRICS:
        raise DataError(f"unknown metric '{name}' in the registry; known: {', '.join(METRICS)}")
    module = importlib.import_module(METRICS[name])
    if hasattr(module, "metrics"):
        return lambda rows, responses: {k: float(v) for k, v in module.metrics(rows, responses).items()}
    return lambda rows, responses: {"task_metric": float(module.task_metric(rows, responses))}


def metric_fn(name: str | None):
    """``(rows, responses) -> float``: the registry metric's task_metric alone, or None without a metric."""
    fn = metrics_fn(name)
    return None if fn is None else lambda rows, responses: fn(rows, responses)["task_metric"]


def task_metrics(model, tokenizer, examples: list[dict], metric: str, *, max_prompt_length: int,
                 max_new_tokens: int, **gen_kw) -> dict[str, float]:
    """The registry metric's numbers (task_metric, ...) on the model's greedy (default) answers to ``examples``'
    prompts; {} without a metric or examples."""
    from rlhf.templates import encode_prompt

    fn = metrics_fn(metric)
    if fn is None or not examples:
        return {}
    kept = [(e, p) for e in examples if (p := encode_prompt(tokenizer, prompt_messages(e), max_prompt_length))]
    responses = generate_text(model, tokenizer, [p for _, p in kept], max_new_tokens=max_new_tokens, **gen_kw)
    return fn([e["meta"] for e, _ in kept], responses)


def task_metrics_of(model, tokenizer, examples: list[dict], metric: str | None, cfg, when: str) -> dict:
    """task_metrics as ``<name>_<when>`` (task_metric_before, ...) with the stage config's max_length,
    max_new_tokens and per_device_eval_batch_size: the held-out check of sft and dpo before and after training."""
    values = task_metrics(model, tokenizer, examples, metric, max_prompt_length=cfg.max_length,
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.per_device_eval_batch_size)
    return {f"{k}_{when}": v for k, v in values.items()}


def policy_eval(generate, prompts: list[list[int]], metas: list[dict], tokenizer, metric: str | None, *, seed: int,
                score=None, accelerator=None) -> dict:
    """Held-out evaluation of a policy inside an RL stage (ppo, grpo): the replies to ``prompts`` sampled (with a
    fixed ``seed``, so every evaluation of a run sees the same draws) and greedy, each measured by the mean reward
    (``score`` given), the share that end with a stop token and the numbers of the registry's checkable metric
    (rlhf.evaluate.metrics_fn: task_metric, and e.g. the demo's pref_metric) against ``metas``.

    ``generate(prompts, do_sample) -> (ids, attn, response_mask, ended)`` (rlhf.generation.generate's result);
    ``score(ids, attn) -> tensor`` of rewards. With ``accelerator`` (several processes) each process takes every
    num_processes-th prompt and the means are weighted by share. Keys: ``eval_<name>`` sampled,
    ``eval_<name>_greedy`` greedy."""
    import torch

    from rlhf.generation import decode

    if not prompts:
        return {}
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    prompts_all, metas_all = prompts, metas
    prompts, metas = prompts[rank::world], metas[rank::world]
    fn = metrics_fn(metric)
    n = len(prompts)
    if not n:  # this process's share is empty (fewer prompts than processes): it measures one, weighted 0
        prompts, metas = prompts_all[:1], metas_all[:1]
    out = {}
    for mode, sample in (("", True), ("_greedy", False)):
        with torch.no_grad(), torch.random.fork_rng(
                devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)
            ids, attn, mask, ended = generate(prompts, sample)
        if score is not None:
            with torch.no_grad():
                out[f"eval_reward{mode}"] = score(ids, attn).float().mean().item()
        out[f"eval_eos_share{mode}"] = ended.float().mean().item()
        if fn is not None:
            values = fn(metas, decode(tokenizer, ids[:, -mask.shape[1] :], mask))
            out.update({f"eval_{k}{mode}": v for k, v in values.items()})
    if world > 1:
        weighted = torch.tensor([n] + [v * n for v in out.values()], dtype=torch.float64, device=accelerator.device)
        sums = accelerator.reduce(weighted, "sum")
        out = {k: (sums[i + 1] / sums[0]).item() for i, k in enumerate(out)}
    return out


def prompt_messages(example: dict) -> list[dict]:
    """The prompt part of an example: everything before its last assistant turn."""
    msgs = example["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


# ---------------------------------------------------------------------------------------------------------------
# a finished stage folder on held-out data (`rlhf eval`, `rlhf generate`)


def generate_all(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, sampling: dict,
                 desc: str = "generate", progress: bool = True) -> list[str]:
    """Replies to tokenized prompts, in order; batches of similar length (less padding), with a progress bar."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            replies = generate_text(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, **sampling)
            for i, r in zip(idx, replies):
                out[i] = r
            bar.update(len(idx))
    return out


def context_length(model, default: int = 2048) -> int:
    """The longest sequence (prompt + reply) ``model`` takes: its config's position limit."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return default


def fit_context(context: int, max_new_tokens: int | None, max_prompt: int | None, *, default_new: int = 256,
                default_prompt: int | None = None) -> tuple[int, int]:
    """(reply tokens, prompt tokens) that fit a model's ``context`` together. A default (None) is capped: the
    reply at half the context, the prompt at the rest; a value the user gave that cannot fit is one line."""
    from rlhf.config import ConfigError

    new = max_new_tokens or min(default_new, max(1, context // 2))
    if new >= context:
        raise ConfigError(f"--max-new-tokens {new} leaves no room for a prompt in the model's context of {context} "
                          "tokens (its max_position_embeddings); give a smaller --max-new-tokens")
    if max_prompt and max_prompt + new > context:
        raise ConfigError(f"--max-length {max_prompt} prompt tokens + --max-new-tokens {new} exceed the model's "
                          f"context of {context} tokens (its max_position_embeddings); lower one of them")
    return new, max_prompt or min(default_prompt or context, context - new)


def encode_prompts(tokenizer, examples: list[dict], max_length: int, what: str) -> tuple[list[list[int]], list[int]]:
    """Prompt ids (generation prompt added) of ``examples`` and the indices of those longer than ``max_length``."""
    from rlhf.templates import encode_prompt

    ids, too_long = [], []
    for i, e in enumerate(examples):
        p = encode_prompt(tokenizer, prompt_messages(e), max_length)
        if p is None:
            too_long.append(i)
        ids.append(p)
    if too_long and len(too_long) == len(examples):
        raise DataError(f"{what}: every prompt is longer than {max_length} tokens (chat template applied); raise "
                        "--max-length")
    return ids, too_long


def _load_or_none(names, kind: str, **kw):
    """Examples of ``kind``, or None when the datasets' format cannot serve it (e.g. prompts have no answers)."""
    from rlhf.data import FormatError, load_examples

    try:
        return load_examples(names, kind=kind, **kw)
    except FormatError:
        return None


@contextlib.contextmanager
def logits_at_labels(model, labels):
    """``with logits_at_labels(model, labels): logits = model(...).logits`` gives ``[N, vocab]`` logits, one row per
    position whose next token is trained (``labels[:, 1:] != -100``, in row order). A pre-hook on the model's output
    layer hands it those positions' hidden states alone, so prompt and padding positions cost no vocabulary-wide
    matmul, log-softmax or memory (most positions of an assistant-only SFT batch; docs/sft.md)."""
    import torch

    keep = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))  # position t predicts label t + 1
    head = getattr(model, "module", model).get_output_embeddings()  # under DDP/DeepSpeed: the wrapped model's
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][keep.to(args[0].device)], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def label_nll(logits, labels, num_items_in_batch=None):
    """Summed next-token negative log-likelihood of ``logits_at_labels``' logits over the trained labels, divided by
    ``num_items_in_batch`` (the trained tokens of the whole accumulated batch, as the model's own loss is) or, when
    None, by this batch's trained tokens."""
    import torch

    targets = labels[:, 1:][labels[:, 1:] != -100].to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        from rlhf.config import ConfigError

        raise ConfigError(f"the model reshapes its output layer's logits ({tuple(logits.shape)} for "
                          f"{targets.numel()} trained positions); set `logits_at_labels_only: false` (sft)")
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return nll / (num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1))


def lm_loss(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 8,
            at_labels: bool = True) -> tuple[float, int]:
    """Mean negative log-likelihood per trained token (the assistant turns, as SFT trains) and the token count;
    ``at_labels``: the logits of the trained positions only (logits_at_labels), else of every position."""
    import torch

    from rlhf.templates import encode_sft

    rows = [r for e in examples if (r := encode_sft(tokenizer, e["messages"], max_length))]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            ids, attn = pad([r["input_ids"] for r in batch], tokenizer.pad_token_id, "right")
            labels = pad([r["labels"] for r in batch], -100, "right")[0]
            with logits_at_labels(model, labels) if at_labels else contextlib.nullcontext():
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            if not at_labels:
                logits = logits[:, :-1][(labels[:, 1:] != -100).to(logits.device)]
            total += label_nll(logits, labels, num_items_in_batch=1).item()
            count += int((labels[:, 1:] != -100).sum())
    if not count:
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
    base: str | None = None  # the user's --base: the folders' base model in another place


def _eval_rm(st: Stage, pairs: list[dict], s: EvalSettings) -> dict:
    from rlhf.scoring import score_pairs

    model, tok = load_stage(st, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    max_length = s.max_length or int(st.config.get("max_length") or 1024)
    chosen = score_pairs(model, tok, pairs, [e["chosen"] for e in pairs], max_length, s.batch_size)
    rejected = score_pairs(model, tok, pairs, [e["rejected"] for e in pairs], max_length, s.batch_size)
    del model
    release()
    return {**pairwise(chosen, rejected), "pairs": len(pairs)}


def _eval_policy(st: Stage, sft_rows, prompt_rows, metric, replies_needed: bool, s: EvalSettings):
    """Loss/perplexity on answered rows; replies to the prompts when something scores them; the task metric.

    Returns (metrics, {prompt index: reply} or None, the reply length used)."""
    from rlhf.config import ConfigError

    model, tok = load_stage(st, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    context = context_length(model)
    if s.max_length and s.max_length > context:
        raise ConfigError(f"--max-length {s.max_length} exceeds the model's context of {context} tokens (its "
                          "max_position_embeddings); give at most that")
    max_length = min(s.max_length or int(st.config.get("max_length") or 1024), context)
    out, replies = {}, None
    if sft_rows:
        loss, tokens = lm_loss(model, tok, sft_rows, max_length, s.batch_size)
        out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)), loss_tokens=tokens)
    # --max-new-tokens, else the stage's (or 256), capped to fit the context with the prompt
    max_new_tokens, limit = fit_context(context, s.max_new_tokens, None, default_new=int(
        st.config.get("max_new_tokens") or 256), default_prompt=int(st.config.get("max_prompt_length") or max_length))
    if replies_needed:
        prompts, too_long = encode_prompts(tok, prompt_rows, limit, "eval prompts")
        keep = [i for i in range(len(prompts)) if prompts[i] is not None]
        got = generate_all(model, tok, [prompts[i] for i in keep], batch_size=s.batch_size,
                           max_new_tokens=max_new_tokens,
                           sampling=s.sampling, desc=f"generate ({st.stage})", progress=s.progress)
        replies = dict(zip(keep, got))
        if too_long:
            out["prompts_too_long"] = len(too_long)
        if metric:
            out.update(metrics_fn(metric)([prompt_rows[i]["meta"] for i in keep], got), task_prompts=len(keep))
    del model
    release()
    return out, replies, max_new_tokens


def _rewards(rm: Stage, prompt_rows: list[dict], replies: dict, s: EvalSettings) -> dict:
    """{prompt index: reward} of the replies under the reward model."""
    from rlhf.scoring import score_pairs

    model, tok = load_stage(rm, quantization=s.quantization, trust_remote_code=s.trust_remote_code)
    idx = sorted(replies)
    vals = score_pairs(model, tok, [{"messages": prompt_messages(prompt_rows[i])} for i in idx],
                       [replies[i] for i in idx], int(rm.config.get("max_length") or 1024), s.batch_size)
    del model
    release()
    return dict(zip(idx, vals))


def evaluate_folder(folder: str, s: EvalSettings, *, rm: str | None = None, baseline: str | None = None) -> dict:
    """Metrics of a stage folder on held-out data (and of a baseline folder of the same kind), as a dict.

    RM folder: pairwise accuracy on a preference dataset. Policy folder (pt/sft/ppo): loss and perplexity on
    answered rows (instruction/conversation datasets), the registry's checkable metric (``metric:``) on the
    replies, and with ``rm`` the mean reward of the replies and, with ``baseline``, the win rate against the
    baseline's replies to the same prompts.
    """
    from rlhf.manifest import StageError
    from rlhf.train_utils import dataset_metric

    st = open_stage(folder, POLICIES + SCORERS, "rlhf eval", s.base)
    kinds = SCORERS if st.stage in SCORERS else POLICIES
    other = open_stage(baseline, kinds, "rlhf eval --baseline", s.base) if baseline else None
    scorer = open_stage(rm, SCORERS, "rlhf eval --rm", s.base) if rm else None
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
    need = bool(metric or rm)
    result["metrics"], replies, new_tokens = _eval_policy(st, sft_rows, prompt_rows, metric, need, s)
    if other:
        result["baseline"]["metrics"], base_replies, _ = _eval_policy(other, sft_rows, prompt_rows, metric, need, s)
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
