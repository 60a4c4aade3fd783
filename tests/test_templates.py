"""Chat templates and label masks, on small byte-level BPE tokenizers trained here."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf.templates import (TEMPLATES, TemplateError, apply_template, encode_pair, encode_prompt, encode_sft,
                            end_of_turn, stop_token_ids)

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["what is two plus two? four.", "the cat sat on the mat.", "Be brief. Answer in one word.",
          "hello world, how are you today?", "and the dog? it ran in the park."] * 3


def make_tokenizer(specials, **kw):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture
def chatml_tok():
    return make_tokenizer(CHATML, eos_token="<|endoftext|>")


SINGLE = [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."},
         {"role": "user", "content": "and the cat?"}, {"role": "assistant", "content": "the cat sat on the mat."}]


def trained_segments(tok, enc):
    """Decoded runs of consecutive trained tokens."""
    segs, cur = [], []
    for i, m in zip(enc["input_ids"], enc["assistant_masks"]):
        if m:
            cur.append(i)
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return [tok.decode(s) for s in segs]


def check_labels(enc):
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["assistant_masks"])
    for i, l, m in zip(enc["input_ids"], enc["labels"], enc["assistant_masks"]):
        assert l == (i if m else -100)


def test_chatml_single_turn_masks_exactly_the_reply_and_end_token(chatml_tok):
    assert apply_template(chatml_tok, "chatml") == "chatml"
    enc = encode_sft(chatml_tok, SINGLE, max_length=256)
    check_labels(enc)
    assert trained_segments(chatml_tok, enc) == ["four.<|im_end|>"]
    assert chatml_tok.decode(enc["input_ids"]) == ("<|im_start|>user\nwhat is two plus two?<|im_end|>\n"
                                                   "<|im_start|>assistant\nfour.<|im_end|>\n")
    assert enc["assistant_masks"][-1] == 0  # the newline after <|im_end|> is not trained
    assert stop_token_ids(chatml_tok) == [chatml_tok.eos_token_id, chatml_tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("name,end",
                         [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("alpaca", "<|end_of_text|>")])
def test_multi_turn_with_system_every_template(name, end):
    tok = make_tokenizer(LLAMA3 + ["<|im_start|>", "<|im_end|>"], bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>")
    apply_template(tok, name)
    enc = encode_sft(tok, MULTI, max_length=512)
    check_labels(enc)
    assert trained_segments(tok, enc) == ["four." + end, "the cat sat on the mat." + end]
    assert end_of_turn(tok) == end
    eot = tok.convert_tokens_to_ids(end)
    assert stop_token_ids(tok) == [tok.eos_token_id] + ([eot] if eot != tok.eos_token_id else [])
    text = tok.decode(enc["input_ids"])
    assert "Be brief." in text and "and the cat?" in text
    assert (enc["input_ids"][0] == tok.bos_token_id) == (name == "llama3")  # only llama3 renders BOS


def test_llama3_without_eot_token_ends_turns_with_eos(chatml_tok):
    apply_template(chatml_tok, "llama3")  # this tokenizer has no <|eot_id|> and no bos
    enc = encode_sft(chatml_tok, SINGLE, max_length=512)
    assert trained_segments(chatml_tok, enc) == ["four.<|endoftext|>"]
    assert stop_token_ids(chatml_tok) == [chatml_tok.eos_token_id]
    assert "<|eot_id|>" not in chatml_tok.chat_template and enc["input_ids"][0] != chatml_tok.eos_token_id


def test_train_on_prompt_trains_every_token(chatml_tok):
    apply_template(chatml_tok, "chatml")
    enc = encode_sft(chatml_tok, MULTI, max_length=512, train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"] and all(enc["assistant_masks"])
    assert enc["input_ids"] == encode_sft(chatml_tok, MULTI, max_length=512)["input_ids"]


def test_truncation_keeps_the_start_and_reports_nothing_left(chatml_tok):
    apply_template(chatml_tok, "chatml")
    full = encode_sft(chatml_tok, MULTI, max_length=512)
    first_reply_end = full["assistant_masks"].index(1) + len(chatml_tok("four.<|im_end|>",
                                                                        add_special_tokens=False)["input_ids"])
    cut = encode_sft(chatml_tok, MULTI, max_length=first_reply_end + 3)
    assert cut["input_ids"] == full["input_ids"][: first_reply_end + 3]
    assert trained_segments(chatml_tok, cut) == ["four.<|im_end|>"]
    check_labels(cut)
    assert encode_sft(chatml_tok, MULTI, max_length=full["assistant_masks"].index(1)) is None  # prompt only


def test_prompt_and_pair_share_tokens(chatml_tok):
    apply_template(chatml_tok, "chatml")
    prompt = encode_prompt(chatml_tok, SINGLE[:1], max_length=256)
    assert chatml_tok.decode(prompt).endswith("<|im_start|>assistant\n")
    ids, truncated = encode_pair(chatml_tok, SINGLE[:1], "four.", max_length=256)
    assert not truncated and ids[: len(prompt)] == prompt
    assert chatml_tok.decode(ids[len(prompt):]) == "four.<|im_end|>"
    assert ids == encode_sft(chatml_tok, SINGLE, max_length=256)["input_ids"][:-1]  # all but the final newline
    assert encode_prompt(chatml_tok, SINGLE[:1], max_length=len(prompt) - 1) is None
    short, truncated = encode_pair(chatml_tok, SINGLE[:1], "four.", max_length=len(prompt) + 1)
    assert truncated and short == ids[: len(prompt) + 1]


def test_auto_keeps_own_template_else_chatml_and_sets_pad(chatml_tok):
    assert chatml_tok.pad_token is None
    assert apply_template(chatml_tok, "auto") == "chatml"
    assert chatml_tok.chat_template == TEMPLATES["chatml"] and chatml_tok.pad_token == "<|endoftext|>"
    own = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}" \
          "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    chatml_tok.chat_template = own
    assert apply_template(chatml_tok, "auto") == "own" and chatml_tok.chat_template == own
    enc = encode_sft(chatml_tok, MULTI, max_length=512)
    assert trained_segments(chatml_tok, enc) == ["four.<|im_end|>", "the cat sat on the mat.<|im_end|>"]
    with pytest.raises(TemplateError, match="did you mean 'chatml'"):
        apply_template(chatml_tok, "chatlm")


def test_templates_that_cannot_mask_are_refused(chatml_tok):
    chatml_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(TemplateError, match="prefix"):
        encode_sft(chatml_tok, SINGLE, max_length=256)
    chatml_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="special token"):
        encode_sft(chatml_tok, SINGLE, max_length=256)
    chatml_tok.chat_template = None
    with pytest.raises(TemplateError, match="apply_template"):
        encode_prompt(chatml_tok, SINGLE[:1], max_length=256)


MODEL_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
                  "<start_of_turn>", "<end_of_turn>"]


@pytest.mark.parametrize("name,first,second", [
    ("llama2", " four. </s>", " the cat sat on the mat. </s>"),
    ("mistral", " four.</s>", " the cat sat on the mat.</s>"),
    ("phi3", "four.<|end|>", "the cat sat on the mat.<|end|>"),
    ("qwen2.5", "four.<|im_end|>", "the cat sat on the mat.<|im_end|>"),
    ("gemma", "four.<end_of_turn>", "the cat sat on the mat.<end_of_turn>"),
])
def test_model_templates_train_exactly_the_replies_and_end_of_turn(name, first, second):
    tok = make_tokenizer(MODEL_SPECIALS, bos_token="<s>", eos_token="</s>")
    assert apply_template(tok, name) == name
    for convo, want in ((MULTI, [first, second]), (MULTI[1:3], [first])):  # with and without a system prompt
        enc = encode_sft(tok, convo, max_length=512)
        check_labels(enc)
        assert trained_segments(tok, enc) == want
        text = tok.decode(enc["input_ids"])
        assert all(m["content"] in text for m in convo)
        prompt = encode_prompt(tok, convo[:-1], max_length=512)
        ids, truncated = encode_pair(tok, convo[:-1], convo[-1]["content"], max_length=512)
        assert not truncated and ids[: len(prompt)] == prompt and tok.decode(ids[len(prompt):]) == want[-1]
    end = want[-1].split(".")[-1].strip()
    assert end_of_turn(tok) == end
    assert stop_token_ids(tok) == [tok.eos_token_id] + ([tok.convert_tokens_to_ids(end)] if end != "</s>" else [])


def test_model_templates_without_their_end_token(chatml_tok):
    apply_template(chatml_tok, "phi3")  # no <|end|> here: turns end with eos, as chatml and llama3 do
    assert trained_segments(chatml_tok, encode_sft(chatml_tok, SINGLE, max_length=256)) == ["four.<|endoftext|>"]
    with pytest.raises(TemplateError, match="<end_of_turn> .* is not one token"):
        apply_template(chatml_tok, "gemma")


def test_auto_without_own_template_says_so_in_the_log(chatml_tok, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="rlhf"):
        assert apply_template(chatml_tok, "auto") == "chatml"
    assert "no chat template of its own; using chatml" in caplog.text


def test_own_template_that_cannot_mask_is_swapped_for_trls_training_version():
    from rlhf.templates import _trl_template

    tok = make_tokenizer(["</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], eos_token="</s>")
    qwen3 = _trl_template("qwen3")  # Qwen3's own template: earlier turns render without the think block
    tok.chat_template = qwen3
    assert apply_template(tok, "auto") == "own" and tok.chat_template == _trl_template("qwen3_training")
    enc = encode_sft(tok, MULTI, max_length=512)
    check_labels(enc)
    assert trained_segments(tok, enc) == ["<think>\n\n</think>\n\nfour.<|im_end|>",
                                          "<think>\n\n</think>\n\nthe cat sat on the mat.<|im_end|>"]
    prompt = encode_prompt(tok, MULTI[:-1], max_length=512)
    assert encode_pair(tok, MULTI[:-1], MULTI[-1]["content"], max_length=512)[0][: len(prompt)] == prompt
    tok.chat_template = TEMPLATES["chatml"]  # one that masks stays as it is
    assert apply_template(tok, "own") == "own" and tok.chat_template == TEMPLATES["chatml"]
