"""Shared fixtures: tiny random-init configs of every supported architecture, a word-level tokenizer, a corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=1, pad_token_id=0)
TINY = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=16, **_COMMON),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=3, **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=8, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=8, sliding_window=16, **_COMMON),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=8, sliding_window=16, **_COMMON),
    "phi3": dict(model_type="phi3", **_COMMON),
    "olmo2": dict(model_type="olmo2", **_COMMON),
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=1, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                     num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    # Layer kinds by index: layer 0 dense, then every second layer sparse (1, 3, 5).
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[0], **_COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[0], **_COMMON),
    "falcon": dict(model_type="falcon", vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                   bos_token_id=1, eos_token_id=1, pad_token_id=0),
    "stablelm": dict(model_type="stablelm", **_COMMON),
    "phi": dict(model_type="phi", **_COMMON),
    "gptj": dict(model_type="gptj", vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=128, rotary_dim=4,
                 bos_token_id=1, eos_token_id=1, pad_token_id=0),
    "bloom": dict(model_type="bloom", vocab_size=128, hidden_size=32, n_layer=6, n_head=4, bos_token_id=1,
                  eos_token_id=1, pad_token_id=0),
    "starcoder2": dict(model_type="starcoder2", **_COMMON),
    "cohere": dict(model_type="cohere", **_COMMON),
}

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "far", "away", "and", "then", "it", "was", "good"]


def make_tokenizer(path: Path, n_doc_ids: int = 1000) -> Path:
    """A word-level fast tokenizer with tokens d0..d{n-1} (document ids) and a few words; EOS is </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    for w in WORDS + [f"d{i}" for i in range(n_doc_ids)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(path)
    return path


def tiny_llama(folder: Path, layers: int = 6) -> Path:
    """A random-init Llama (seeded) with the word-level tokenizer, saved as a Hugging Face directory."""
    from chop.models.loading import load_model

    make_tokenizer(folder)
    load_model(config={**TINY["llama"], "vocab_size": 1100, "num_hidden_layers": layers}).save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_docs: int, words_per_doc: int = 7, field: str = "text", start: int = 0) -> Path:
    """Documents 'd<i> w w w ...' — each exactly ``words_per_doc + 1`` tokens plus EOS."""
    with open(path, "w") as f:
        for i in range(start, start + n_docs):
            words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(words_per_doc)]
            f.write(json.dumps({field: " ".join([f"d{i}", *words])}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", 64)


def scalars(logdir):
    """Every scalar in a TensorBoard log directory, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for ev in sorted(Path(logdir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out
