"""Batched log-likelihood scoring of (context, continuation) pairs, with lm-evaluation-harness's tokenisation.

One forward of the model body per batch; the LM head and the log-softmax run only at the positions that predict
continuation tokens (not over every context token), which is where most of a small-model evaluation's time went.
Requests with the same context share one row (the context once, each continuation in its own masked segment), which
halves the tokens of a multiple-choice suite. Rows are sorted by length so batches carry little padding; padding is on
the right and the attention causal, so it changes nothing before it. Under DDP each rank scores a share of the rows
and all ranks gather the results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chop.training.losses import output_head

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for models that state no context length
HEAD_CHUNK = 4096  # continuation positions whose logits are formed at once
# cuDNN's attention builds a plan for every new batch shape (seconds, cold); the length-sorted batches of an
# evaluation are nearly all new shapes.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MAX_BATCH_TOKENS = 2**17  # larger batches gain no speed and, sorted by length, carry more padding


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
        config = model.config.get_text_config()
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        self.segments = not sliding and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")

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
        # Requests with the same context share one row: the context once, then each continuation's tokens (all but
        # its last, which is only predicted) in its own segment that sees the context and itself, not the others
        # (a block mask and position ids that restart after the context). The first continuation token is
        # predicted from the shared last context position, exactly as each request alone would predict it.
        # Models whose attention cannot take such a mask (sliding windows, flash-attention) share a row only between
        # single-token continuations, which need no segments (MMLU's A-D, BoolQ's yes/no).
        rows: dict[tuple, tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            full = (ctx + cont)[-(self.max_len + 1):]  # as lm-eval: at most max_len inputs, cut from the left
            n = min(len(cont), len(full) - 1)
            stem = tuple(full[:len(full) - n][-self.max_len:])
            key = stem if n <= 1 or self.segments else (stem, i)
            rows.setdefault(key, (stem, []))[1].append((i, full[len(full) - n:]))
        rank, world = _dist()
        width = {k: len(stem) + sum(max(0, len(c) - 1) for _, c in conts) for k, (stem, conts) in rows.items()}
        order = sorted(rows, key=lambda k: (-width[k], rows[k][0]))  # longest first, as lm-eval
        scores: dict[int, tuple[float, bool]] = {}
        mine = [rows[k] for k in order[rank::world]]
        widths = [width[k] for k in order[rank::world]]
        start, budget = 0, self._token_budget(widths[0] if mine else 1)
        while start < len(mine):
            n = max(1, min(len(mine) - start, budget // max(1, widths[start])))
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

    def _token_budget(self, longest: int) -> int:
        """Tokens per batch: ``batch_size`` rows of the longest; ``auto`` on GPU: what half the free memory holds of
        one layer's activations in bf16 (inference keeps one layer's at a time), at most ``MAX_BATCH_TOKENS``."""
        if self.batch_size != "auto":
            return self.batch_size * longest
        if self.device.type != "cuda":
            return 32 * longest
        config = self.model.config.get_text_config()
        inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
        per_token = 2 * (3 * inter + 8 * config.hidden_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(longest, min(MAX_BATCH_TOKENS, int(0.5 * free / per_token)))

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]) -> dict[int, tuple[float, bool]]:
        """Scores of one batch of rows: (stem tokens, [(request index, continuation tokens), ...])."""
        device = self.device
        requests = [i for _, conts in batch for i, _ in conts]
        counts = np.array([len(conts) for _, conts in batch], dtype=np.int64)
        n_cont = np.fromiter((len(c) for _, conts in batch for _, c in conts), dtype=np.int64, count=len(requests))
        stem = np.fromiter((len(s) for s, _ in batch), dtype=np.int64, count=len(batch))
        # A row's pieces: its stem, then a segment per continuation (its tokens but the last). Per piece: length,
        # offset within its row, the position of its first token (a segment's continues from the stem), segment id.
        first = np.arange(len(batch)) + np.cumsum(counts) - counts
        is_stem = np.zeros(len(batch) + len(requests), dtype=bool)
        is_stem[first] = True
        length = np.empty(len(is_stem), dtype=np.int64)
        length[is_stem], length[~is_stem] = stem, np.maximum(n_cont - 1, 0)
        start = np.cumsum(length) - length
        offset = start - np.repeat(start[first], counts + 1)
        pos0 = np.where(is_stem, 0, np.repeat(stem, counts + 1))
        segment_id = np.where(is_stem, 0, np.cumsum(~is_stem))
        row_len = np.add.reduceat(length, first)
        fill = np.arange(int(row_len.max())) < row_len[:, None]  # row-major: each row's tokens, then padding
        ids = np.zeros(fill.shape, dtype=np.int64)
        ids[fill] = np.fromiter(chain.from_iterable(p for s, conts in batch for p in chain((s,), (c[:-1] for _, c in conts))),
                                dtype=np.int64, count=int(length.sum()))
        # Continuation token j is predicted at the stem's last position (j = 0), else at its segment's token j - 1.
        row_of = np.repeat(np.arange(len(batch)), counts)
        j = np.arange(int(n_cont.sum())) - np.repeat(np.cumsum(n_cont) - n_cont, n_cont)
        rows = np.repeat(row_of, n_cont)
        cols = np.where(j == 0, np.repeat(stem[row_of] - 1, n_cont), np.repeat(offset[~is_stem], n_cont) + j - 1)
        target = np.fromiter(chain.from_iterable(c for _, conts in batch for _, c in conts), dtype=np.int64,
                             count=len(rows))
        owner = np.repeat(np.arange(len(requests)), n_cont)
        kwargs = {}
        if (np.add.reduceat((~is_stem & (length > 0)).astype(np.int64), first) > 1).any():  # rows of 2+ segments
            position, segment = np.zeros_like(ids), np.zeros_like(ids)
            position[fill] = np.repeat(pos0 - start, length) + np.arange(int(length.sum()))
            segment[fill] = np.repeat(segment_id, length)
            kwargs = {"position_ids": torch.from_numpy(position).to(device),
                      "attention_mask": self._segment_mask(torch.from_numpy(segment).to(device))}
        rows_t, cols_t, target, owner_t = (torch.from_numpy(x).to(device, non_blocking=True)
                                           for x in (rows, cols, target, owner))
        with sdpa_kernel(ATTENTION_BACKENDS):
            hidden = self.model.base_model(input_ids=torch.from_numpy(ids).to(device), use_cache=False,
                                           **kwargs).last_hidden_state
        picked = hidden[rows_t, cols_t]
        logp, misses = torch.empty(len(target), device=device), torch.empty(len(target), device=device)
        for i in range(0, len(target), HEAD_CHUNK):  # bounded memory: float32 logits of HEAD_CHUNK positions at a time
            logits = self.head(picked[i:i + HEAD_CHUNK])
            t = target[i:i + HEAD_CHUNK]
            # In float32 whatever the model's dtype, in one pass over the logits (no float32 copy of them first).
            logp[i:i + HEAD_CHUNK] = F.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, t[:, None])[:, 0]
            misses[i:i + HEAD_CHUNK] = (logits.argmax(-1) != t).float()
        n = len(requests)
        ll = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, owner_t, logp.double()).tolist()
        miss = torch.zeros(n, device=device).index_add_(0, owner_t, misses).tolist()
        return {i: (ll[k], miss[k] == 0) for k, i in enumerate(requests)}

    def _segment_mask(self, segment: torch.Tensor) -> torch.Tensor:
        """Additive attention mask (batch, 1, width, width): causal, and a segment sees the stem (0) and itself."""
        index = torch.arange(segment.shape[1], device=segment.device)
        allowed = (index[None, :] <= index[:, None]) & ((segment[:, None, :] == 0) |
                                                         (segment[:, None, :] == segment[:, :, None]))
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


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
