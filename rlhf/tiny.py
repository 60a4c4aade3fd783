"""Tiny random models and locally trained tokenizers, for tests and the CPU demo.

Nothing here touches the network: the tokenizer is a byte-level BPE trained with the
`tokenizers` library on a few hundred lines, the model is a random init of a small
transformers config saved with ``save_pretrained``.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bloom")
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]

_NOUNS = ["cat", "dog", "bird", "tree", "river", "house", "book", "apple", "car", "city", "teacher", "child"]
_VERBS = ["sees", "likes", "finds", "reads", "draws", "counts", "follows", "paints", "builds", "answers"]
_ADJS = ["small", "red", "old", "quiet", "happy", "green", "tall", "bright", "slow", "kind"]


def sample_texts(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` short English sentences with numbers and a little arithmetic, deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = i % 4
        if kind == 0:
            out.append(f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}.")
        elif kind == 1:
            out.append(f"What is {a} plus {b}? The answer is {a + b}.")
        elif kind == 2:
            out.append(f"There are {a} {rng.choice(_NOUNS)}s and {b} {rng.choice(_ADJS)} {rng.choice(_NOUNS)}s in the "
                       f"{rng.choice(_NOUNS)}.")
        else:
            out.append(f"Please write a {rng.choice(_ADJS)} story about a {rng.choice(_NOUNS)} in {a} words.")
    return out


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    ``<|endoftext|>`` is eos, bos and pad; ``<|im_start|>`` and ``<|im_end|>`` are special tokens.
    Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    *,
    tokenizer=None,
    **kw,
):
    """A small transformers config of architecture ``arch`` (one of ``ARCHS``).

    With ``tokenizer``, pad/bos/eos token ids come from it. Extra ``kw`` override config fields.
    """
    import transformers as tf

    inter = 2 * hidden_size
    common = dict(vocab_size=vocab_size)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        fields = dict(hidden_size=hidden_size, intermediate_size=inter, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    elif arch == "gpt2":
        cls = tf.GPT2Config
        fields = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                      n_inner=inter)
    elif arch == "gpt_neox":
        cls = tf.GPTNeoXConfig
        fields = dict(hidden_size=hidden_size, intermediate_size=inter, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, max_position_embeddings=max_positions)
    elif arch == "bloom":
        cls = tf.BloomConfig
        fields = dict(hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads)
    else:
        raise ValueError(f"tiny_config: unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    if tokenizer is not None:
        common.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return cls(**{**common, **fields, **kw})


def make_tiny_model(out_dir: str, arch: str = "llama", tokenizer=None, seed: int = 0, **cfg_kw) -> str:
    """Save a random-init ``arch`` model (safetensors) and its tokenizer into ``out_dir``; return ``out_dir``.

    ``tokenizer`` is a tokenizer object or a folder; None trains one on ``sample_texts()``.
    ``cfg_kw`` go to ``tiny_config`` (hidden_size, num_layers, ...; vocab_size: more rows than the tokenizer's).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_tokenizer(sample_texts(), str(out))
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg = tiny_config(arch, tokenizer=tokenizer, **{"vocab_size": len(tokenizer), **cfg_kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)
