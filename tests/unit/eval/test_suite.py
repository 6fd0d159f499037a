"""Task metrics (chop/eval/suite.py): accuracy of a rigged model, word/byte perplexity, token perplexity of c4 blocks."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import EVAL_FIX, TINY
from torch import nn
from transformers import LlamaConfig

from chop.eval.engine import Scorer
from chop.eval.suite import evaluate, requests_of
from chop.eval.tasks import TASKS, load_docs
from chop.models.loading import load_model

MC = [t for t in TASKS.values() if t.kind == "multiple_choice"]


class Rigged(nn.Module):
    """A 'language model' that puts all its probability on the next token of some gold (context + continuation)."""

    def __init__(self, golds, vocab):
        super().__init__()
        self.next = {tuple(g[:i]): g[i] for g in golds for i in range(1, len(g))}
        self.vocab = vocab
        self.config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.base_model = self._body

    def _body(self, input_ids, use_cache=False, attention_mask=None, position_ids=None):
        # A token's history is what the attention mask lets it see (shared-context rows hold several continuations).
        out = torch.full((*input_ids.shape, self.vocab), -20.0)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                seen = range(t + 1) if attention_mask is None else (attention_mask[b, 0, t] == 0).nonzero()[:, 0]
                nxt = self.next.get(tuple(row[k] for k in seen))
                if nxt is not None:
                    out[b, t, nxt] = 20.0
        return SimpleNamespace(last_hidden_state=out)

    def get_output_embeddings(self):
        return nn.Identity()


def test_a_model_rigged_to_prefer_the_gold_scores_100_percent(eval_tokenizer):
    probe = Scorer(load_model(config=dict(TINY["llama"], vocab_size=len(eval_tokenizer))), eval_tokenizer)
    golds = []
    for task in MC:
        for doc in load_docs(task, str(EVAL_FIX)):
            choices = task.choices(doc)
            gold = task.text(doc) if task.multiple_input else task.target(doc)
            c, x = requests_of(task, doc)[choices.index(gold) if isinstance(gold, str) else int(gold)]
            golds.append(sum(probe.encoder.encode_pair(c, x), []))
    rigged = Rigged(golds, len(eval_tokenizer))
    results = evaluate(rigged, eval_tokenizer, [t.name for t in MC], data_dir=str(EVAL_FIX), batch_size=4)
    for name, r in results.items():
        assert r.n >= 6
        for metric, value in r.metrics.items():
            assert value == 1.0, (name, metric)


def test_perplexity_task_reports_word_and_byte_perplexity(eval_model, eval_tokenizer):
    r = evaluate(eval_model, eval_tokenizer, "wikitext", data_dir=str(EVAL_FIX), batch_size=4)["wikitext"]
    docs = load_docs(TASKS["wikitext"], str(EVAL_FIX))
    n_bytes = sum(len(d["page"].encode()) for d in docs)
    ll = sum(s["ll"] for s in r.samples)
    assert r.metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes))
    assert r.metrics["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2))
    assert r.metrics["word_perplexity"] > r.metrics["byte_perplexity"] > 1


def test_c4_perplexity_is_token_perplexity_over_packed_blocks(eval_model, eval_tokenizer):
    from chop.data.text import pack_blocks
    from chop.eval.tasks import stream_texts

    scorer = Scorer(eval_model, eval_tokenizer, batch_size=2, max_len=64)
    r = evaluate(eval_model, eval_tokenizer, "c4", data_dir=str(EVAL_FIX), limit=5, scorer=scorer)["c4"]
    blocks = pack_blocks(stream_texts(TASKS["c4"], str(EVAL_FIX)), eval_tokenizer, 65, 5)
    assert r.n == 5 and len(blocks) == 5 and all(len(b) == 65 for b in blocks)
    total = 0.0
    with torch.no_grad():
        for b in blocks:
            logp = F.log_softmax(eval_model(b[None, :-1]).logits[0].float(), -1)
            total += logp.gather(1, b[1:, None]).sum().item()
    assert r.metrics["perplexity"] == pytest.approx(math.exp(-total / (5 * 64)), rel=1e-5)
