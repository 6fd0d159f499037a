"""Shared fixtures (the helpers they use, and every other shared test helper, are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SMOL, TINY, make_tokenizer, write_corpus  # noqa: E402  (after the environment is set)

from chop.models.loading import load_model, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", 64)


# The zero-shot engine's tests: SmolLM2's tokenizer (real BPE on real text) and a tiny random Llama of its vocabulary.
@pytest.fixture(scope="module")
def eval_tokenizer():
    return load_tokenizer(SMOL)


@pytest.fixture(scope="module")
def eval_model(eval_tokenizer):
    torch.manual_seed(0)
    return load_model(config=dict(TINY["llama"], vocab_size=len(eval_tokenizer), max_position_embeddings=512),
                      attn_implementation="eager").eval()
