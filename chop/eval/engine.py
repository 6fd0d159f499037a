"""Batched log-likelihood scoring of (context, continuation) pairs, with lm-evaluation-harness's tokenisation.

One forward of the model body per batch; the LM head and the log-softmax run only at the positions that predict
continuation tokens (not over every context token), which is where most of a small-model evaluation's time went.
Requests are sorted by length so batches carry little padding; padding is on the right and the attention causal, so
it changes nothing before it. Under DDP each rank scores a share of the requests and all ranks gather the results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chop.training.losses import output_head

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for models that state no context length
HEAD_CHUNK = 4096  # continuation positions whose logits are formed at once


def max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval's HF backend uses: the config's, else the tokenizer's, else 2048."""
    config = model.config.get_text_config()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else DEFAULT_MAX_LENGTH


class Scorer:
    """Scores requests against ``model`` the way lm-eval's ``--model hf`` does, faster.

    ``batch_size``: sequences per batch for the longest requests (shorter ones are packed to the same number of
    tokens), or ``auto`` (``_token_budget``; CPU: 32).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: Union[int, str] = "auto", max_len: Optional[int] = None) -> None:
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size: {batch_size!r} must be a positive integer or 'auto'")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_len = max_len or max_length(model, tokenizer)
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode(self.prefix_id)
        self.head = output_head(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenisation, as lm-eval -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # The tokenizer's own special tokens, except when the text already starts with the prefix token.
        special = {"add_special_tokens": False} if text.startswith(self._prefix_text) else {}
        return self.tokenizer.encode(text, **special)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens: the context's trailing spaces move to the continuation, the pair is
        encoded whole and split where the context's own encoding ends; an empty context is the prefix token."""
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """``encode_pair`` of many requests; each distinct text is encoded once, in batches (the tokenizer's threads)."""
        split = []
        for context, continuation in requests:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((context, continuation))
        texts = sorted({t for c, x in split if c for t in (c, c + x)})
        ids = dict(zip(texts, self._encode_many(texts)))
        out = []
        for context, continuation in split:
            if not context:
                out.append(([self.prefix_id], self.encode(continuation)))
            else:
                ctx = ids[context]
                out.append((ctx, ids[context + continuation][len(ctx):]))
        return out

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        plain = [t for t in texts if not t.startswith(self._prefix_text)]
        rust = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its Rust core, in threads
        if rust is not None:
            ids = [e.ids for e in rust.encode_batch(plain, add_special_tokens=True)]
        else:
            ids = self.tokenizer(plain)["input_ids"] if plain else []
        encoded = dict(zip(plain, ids))
        return [encoded[t] if t in encoded else self.encode(t) for t in texts]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding would produce it) per request."""
        return self.score_tokens(self.encode_pairs(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length, each token predicted once with
        as much context as fits (lm-eval's rolling windows, context length 1)."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for ctx, cont in rolling_windows(self.encode(text), self.prefix_id, self.max_len):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += ll
        return totals

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Requests with the same input (choices of one token after a shared context: MMLU's A-D, BoolQ's yes/no)
        # share one row of the batch: the same logits serve each of their continuations, exactly.
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            full = (ctx + cont)[-(self.max_len + 1):]
            rows.setdefault(tuple(full[:-1]), []).append((i, full[len(full) - len(cont):] if cont else []))
        rank, world = _dist()
        order = sorted(rows, key=lambda inp: (-len(inp), inp))  # longest first, as lm-eval
        scores: dict[int, tuple[float, bool]] = {}
        mine = [(inp, rows[inp]) for inp in order[rank::world]]
        start, budget = 0, self._token_budget(mine)
        while start < len(mine):
            n = max(1, min(len(mine) - start, budget // max(1, len(mine[start][0]))))
            try:
                scores.update(self._score_batch(mine[start:start + n]))
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                budget = max(1, budget // 2)  # too generous a guess: halve it and try this batch again
                torch.cuda.empty_cache()
                continue
            start += n
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, scores)
            scores = {k: v for part in gathered for k, v in part.items()}
        return [scores[i] for i in range(len(pairs))]

    def _token_budget(self, rows: list) -> int:
        """Tokens per batch: ``batch_size`` rows of the longest input; ``auto`` on GPU: what half the free memory
        holds of one layer's activations in bf16 (inference keeps one layer's at a time), halved on OOM."""
        longest = len(rows[0][0]) if rows else 1
        if self.batch_size != "auto":
            return self.batch_size * longest
        if self.device.type != "cuda":
            return 32 * longest
        config = self.model.config.get_text_config()
        inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
        per_token = 2 * (3 * inter + 8 * config.hidden_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(longest, int(0.5 * free / per_token))

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]) -> dict[int, tuple[float, bool]]:
        device = self.device
        width = max(len(inp) for inp, _ in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        rows, cols, targets, owner, requests = [], [], [], [], []
        for b, (inp, conts) in enumerate(batch):
            ids[b, :len(inp)] = inp
            for i, cont in conts:
                n = len(cont)
                rows += [b] * n
                cols += range(len(inp) - n, len(inp))
                targets += cont
                owner += [len(requests)] * n
                requests.append(i)
        rows_t, cols_t, target, owner_t = (torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)
                                           for x in (rows, cols, targets, owner))
        ids = torch.from_numpy(ids)
        hidden = self.model.base_model(input_ids=ids.to(device), use_cache=False).last_hidden_state
        picked = hidden[rows_t, cols_t]
        logp, misses = torch.empty(len(target), device=device), torch.empty(len(target), device=device)
        for i in range(0, len(target), HEAD_CHUNK):  # bounded memory: float32 logits of HEAD_CHUNK positions at a time
            logits = self.head(picked[i:i + HEAD_CHUNK]).float()
            t = target[i:i + HEAD_CHUNK]
            logp[i:i + HEAD_CHUNK] = F.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)
            misses[i:i + HEAD_CHUNK] = (logits.argmax(-1) != t).float()
        n = len(requests)
        ll = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, owner_t, logp.double()).tolist()
        miss = torch.zeros(n, device=device).index_add_(0, owner_t, misses).tolist()
        return {i: (ll[k], miss[k] == 0) for k, i in enumerate(requests)}


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering ``tokens``: the first conditioned on ``prefix``, the rest on
    the tokens before them, each window's input at most ``max_len`` long (lm-eval's rolling windows)."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        yield tokens[max(0, end - max_len - 1):done], tokens[done:end]
        done = end


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
