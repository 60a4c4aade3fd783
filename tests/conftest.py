"""Shared test setup: offline, one thread, tiny tokenizer and models built once per session."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"  # docs/known_traps.md: 2 threads on 2 shared cores swing 8-50x
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """Folder of a byte-level BPE tokenizer (vocab 512) trained on 200 generated sentences."""
    from rlhf.tiny import sample_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(sample_texts(200), str(out), vocab_size=512)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: ``tiny_model_dir(arch="llama")`` -> folder of a random tiny model + tokenizer, cached per arch."""
    from transformers import AutoTokenizer

    from rlhf.tiny import make_tiny_model

    cache: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in cache:
            tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[arch] = make_tiny_model(str(out), arch, tokenizer=tok)
        return cache[arch]

    return make
