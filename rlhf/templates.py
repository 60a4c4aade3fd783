"""Chat templates, and tokenization with label masks.

Masking: for each assistant turn i the conversation is rendered up to turn i with the
generation prompt (the prefix) and up to and including turn i (the full text); the
assistant's tokens are full minus prefix, cut just after the end-of-turn token (the
newline some templates put after it stays masked). Rendering must keep this prefix
property, or a TemplateError says so. The text is tokenized segment by segment
(masked, trained, masked, ...) so labels line up with tokens exactly, and
``encode_prompt`` tokenizes a prompt the way ``encode_sft``/``encode_pair`` do.

End of turn: chatml and qwen2.5 end turns with ``<|im_end|>``, llama3 with ``<|eot_id|>``,
phi3 with ``<|end|>``, gemma with ``<end_of_turn>``, alpaca, llama2 and mistral with
``tokenizer.eos_token``. qwen2.5 and gemma are trl's training templates, read from the
installed trl. A tokenizer's own template is kept when it can mask; one that cannot (not
prefix-preserving, e.g. Qwen3's) is replaced by trl's training version of it, if trl has one.
When a built-in template's marker is not a single token of the tokenizer, ``apply_template``
makes the template end turns with ``tokenizer.eos_token`` instead (qwen2.5 and gemma, trl's
text, are refused), so generation can stop on an id. For any template,
the end-of-turn token is found by rendering a probe conversation: the first token
after the assistant's text must be a special (added) token.

BOS: only what the template renders (llama3 renders ``bos_token``, e.g.
``<|begin_of_text|>``; chatml and alpaca render none); text is tokenized with
``add_special_tokens=False`` so nothing is added twice.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from rlhf.errors import RlhfError, did_you_mean

log = logging.getLogger("rlhf")


def _trl_template(name: str) -> str:
    """One of trl's training chat templates (trl/chat_templates/<name>.jinja): the model's own template made
    prefix-preserving, with {% generation %} marks (rendered as plain text here). Read without importing trl."""
    spec = importlib.util.find_spec("trl")
    return Path(spec.submodule_search_locations[0], "chat_templates", f"{name}.jinja").read_text()


TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- set eot = '<|im_end|>' -%}"
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eot + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{%- set eot = '<|eot_id|>' -%}"
        "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + eot }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
    "alpaca": (
        "{%- set eot = eos_token -%}"
        "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\n\n' }}"
        "{%- else -%}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\n' + message['content'] + eot + '\n\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\n' }}{%- endif -%}"
    ),
    # Llama-2-chat: [INST] blocks, the system prompt in <<SYS>> inside the first one, a turn ends with eos
    "llama2": (
        "{%- set eot = eos_token -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' -%}{%- set msgs = messages[1:] -%}"
        "{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}"
        "{%- for message in msgs -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ (bos_token or '') + '[INST] ' + (sys if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] | trim + ' ' + eot }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Mistral-Instruct: one bos, [INST] blocks, the system prompt before the first user message, eos ends a turn
    "mistral": (
        "{%- set eot = eos_token -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = messages[0]['content'] + '\n\n' -%}{%- set msgs = messages[1:] -%}"
        "{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}"
        "{{ bos_token or '' }}"
        "{%- for message in msgs -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '[INST] ' + (sys if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] | trim + eot }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Phi-3(.5)-instruct: trl's phi3_training ends a finished conversation with eos after <|end|>\n, which breaks the
    # prefix property for all but the last turn; this is the same template without that eos
    "phi3": (
        "{%- set eot = '<|end|>' -%}"
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eot + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
    ),
    "qwen2.5": _trl_template("qwen2_5_training"),  # Qwen2.5 (default system prompt, tools)
    "gemma": _trl_template("gemma3_training"),  # Gemma 2/3 (the system prompt goes before the first user message)
}
# the end-of-turn marker of each template; alpaca, llama2 and mistral end turns with eos_token already
_MARKERS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "phi3": "<|end|>", "qwen2.5": "<|im_end|>",
            "gemma": "<end_of_turn>"}
_FIXED = ("qwen2.5", "gemma")  # trl's text, kept as is: the tokenizer must have the marker as one token
_PROBE = "Zq7 probe reply"
_PREFIX_BROKEN = ("the chat template breaks the prefix property at {where}: the text up to an assistant turn "
                  "(with the generation prompt) is not a prefix of the text with the reply, so prompt and reply "
                  "tokens cannot be told apart; use a built-in template (template: chatml)")


class TemplateError(RlhfError, ValueError):
    """A chat template that cannot be used for masked training; the message says why and what to do."""


def apply_template(tokenizer, name: str = "auto") -> str:
    """Set ``tokenizer.chat_template`` and make sure there is a pad token; return the template's name.

    ``auto`` keeps the tokenizer's own template if it has one (returns ``own``), else uses chatml.
    ``own`` insists on the tokenizer's template. The pad token, when missing, becomes the eos token.
    """
    if tokenizer.eos_token is None:
        raise TemplateError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) before training")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name in ("auto", "own"):
        if tokenizer.chat_template:
            _trainable_own(tokenizer)
            return "own"
        if name == "own":
            raise TemplateError("template 'own': the tokenizer has no chat template; pick one of "
                                f"{', '.join(TEMPLATES)}")
        log.info("template auto: the tokenizer has no chat template of its own; using chatml (set template: to one "
                 "of %s to choose)", ", ".join(TEMPLATES))
        name = "chatml"
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template '{name}'; use auto, own, or one of {', '.join(TEMPLATES)}"
                            f"{did_you_mean(name, TEMPLATES)}")
    template = TEMPLATES[name]
    marker = _MARKERS.get(name)
    if marker and len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
        if name in _FIXED:
            raise TemplateError(f"template {name}: {marker} (its end of turn) is not one token of this tokenizer; "
                                f"use it with the model's own tokenizer, or pick another template (e.g. chatml)")
        # Not one token here: end turns with eos so generation can stop on an id.
        template = template.replace(f"{{%- set eot = '{marker}' -%}}", "{%- set eot = eos_token -%}")
    tokenizer.chat_template = template
    return name


_TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE},
              {"role": "user", "content": "And?"}, {"role": "assistant", "content": _PROBE}]


def _trainable_own(tokenizer) -> None:
    """Keep the tokenizer's own template when assistant turns can be masked with it; else swap in trl's training
    version of it when trl has one that can (Qwen3's own template renders earlier turns otherwise than the last)."""
    own = tokenizer.chat_template
    try:
        _assistant_spans(tokenizer, _TWO_TURNS)
        return
    except Exception:  # noqa: BLE001 - any failure to mask: try trl's version; encode_sft says why if none fits
        pass
    try:
        from trl.chat_template_utils import get_training_chat_template

        tokenizer.chat_template = get_training_chat_template(tokenizer) or own
        _assistant_spans(tokenizer, _TWO_TURNS)
    except Exception:  # noqa: BLE001 - trl knows no fitting version: keep the own one
        tokenizer.chat_template = own
        return
    if tokenizer.chat_template != own:
        log.info("the tokenizer's own chat template cannot mask assistant turns (not prefix-preserving); using trl's "
                 "training version of it")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise TemplateError("the tokenizer has no chat template; call rlhf.templates.apply_template(tokenizer) first")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def end_of_turn(tokenizer) -> str:
    """The token that ends an assistant turn in the tokenizer's chat template (found by rendering a probe)."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    prefix, full = _render(tokenizer, msgs[:1], True), _render(tokenizer, msgs, False)
    if not full.startswith(prefix):
        raise TemplateError(_PREFIX_BROKEN.format(where="a probe conversation"))
    at = full.find(_PROBE, len(prefix))
    if at < 0:
        raise TemplateError("the chat template does not render the assistant's reply; use a built-in template "
                            "(template: chatml)")
    after = full[at + len(_PROBE):].lstrip()
    ids = _ids(tokenizer, after)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if not ids or ids[0] not in special:
        raise TemplateError(f"the chat template does not end an assistant turn with a special token (it renders "
                            f"{after[:30]!r} after the reply), so the model could not learn to stop; use a built-in "
                            "template (template: chatml)")
    return tokenizer.convert_ids_to_tokens(ids[0])


def stop_token_ids(tokenizer) -> list[int]:
    """Ids generation stops on: eos and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    return ids + [eot] if eot not in ids else ids


def _assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    eot = end_of_turn(tokenizer)
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise TemplateError(_PREFIX_BROKEN.format(where=f"message {i + 1}"))
        k = upto.rfind(eot, len(prefix))
        if k < 0:
            raise TemplateError(f"assistant turn at message {i + 1} does not end with the end-of-turn token {eot!r}")
        start, end = len(prefix), k + len(eot)
        if spans and start < spans[-1][1]:
            raise TemplateError("the chat template renders assistant turns out of order")
        spans.append((start, end))
    return full, spans


def encode_sft(tokenizer, messages, max_length: int, train_on_prompt: bool = False) -> dict | None:
    """input_ids, labels (-100 where masked) and assistant_masks (1 where trained) for one conversation.

    Every assistant turn is trained, end-of-turn token included; system and user tokens are masked
    unless ``train_on_prompt``. Longer than ``max_length``: the start is kept. Returns None when no
    trained token is left after truncation (callers count and drop such examples).
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("encode_sft needs a conversation with at least one assistant turn")
    text, spans = _assistant_spans(tokenizer, messages)
    ids, mask, pos = [], [], 0
    for start, end in spans:
        for seg, trained in ((text[pos:start], train_on_prompt), (text[start:end], True)):
            seg_ids = _ids(tokenizer, seg)
            ids += seg_ids
            mask += [int(trained)] * len(seg_ids)
        pos = end
    tail = _ids(tokenizer, text[pos:])
    ids, mask = (ids + tail)[:max_length], (mask + [int(train_on_prompt)] * len(tail))[:max_length]
    if not any(mask):
        return None
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)], "assistant_masks": mask}


def encode_prompt(tokenizer, messages, max_length: int) -> list[int] | None:
    """Prompt ids with the generation prompt (the start of the assistant turn); None if over ``max_length``."""
    ids = _ids(tokenizer, _render(tokenizer, messages, True))
    return ids if len(ids) <= max_length else None


def encode_pair(tokenizer, messages, response: str, max_length: int) -> tuple[list[int], bool]:
    """Prompt + response as one complete assistant turn (end-of-turn token included); (ids, truncated).

    The prompt part equals ``encode_prompt``'s ids. Longer than ``max_length``: the start is kept.
    """
    text, spans = _assistant_spans(tokenizer, list(messages) + [{"role": "assistant", "content": response}])
    start, end = spans[-1]
    ids = _ids(tokenizer, text[:start]) + _ids(tokenizer, text[start:end])
    return ids[:max_length], len(ids) > max_length
