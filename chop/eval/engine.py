"""Batched log-likelihood scoring of (context, continuation) pairs, with lm-evaluation-harness's tokenisation and
arithmetic, so that its numbers come out identical in any dtype.

A row is one distinct model input, as in lm-eval (requests whose context plus continuation minus its last token are
the same share it: the one-token answers of a multiple-choice question). The model body runs once per batch of
length-sorted rows, right-padded and without an attention mask (causal, so padding changes nothing before it, and
the attention kernel is the one lm-eval's plain forward gets); the LM head and the log-softmax run, in the model's
dtype as lm-eval's do, only at the positions that predict continuation tokens. lm-eval's log-likelihoods are sums
rounded to the model's dtype; so are these. Under DDP each rank scores a share of the rows and all ranks gather them;
sharded (FSDP), every rank runs as many batches as the busiest one (a forward gathers each unit's shards from all).

``share_contexts`` trades that identity for half the tokens of a multiple-choice suite: the choices of one context
share a row, the context once and each continuation in its own masked segment. The masked attention runs other
kernels, so bf16 numbers then differ from lm-eval's by bf16 rounding (float32 ones by float32 rounding).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chop.models.registry import output_head

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for models that state no context length
HEAD_CHUNK = 4096  # continuation positions whose logits are formed at once
# Fast mode's attention (share_contexts): cuDNN's, first in PyTorch's own order on an H100/H200, builds a plan for
# every new shape (of batch, width and mask), which costs seconds on a suite of many shapes; flash attention none.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MAX_BATCH_TOKENS = 2**17  # larger batches gain no speed and, sorted by length, carry more padding
CACHE_VERSION = 1  # of Encoder's rules: a change to how pairs are encoded must bump it (old caches then go unread)


def rows_in_batch(widths: Sequence[int], start: int, cap: int, fixed: bool) -> int:
    """Rows of the batch that starts at row ``start`` of rows sorted longest first: ``cap`` rows (an integer batch
    size), or as many as ``cap`` tokens hold at that row's width (auto)."""
    return max(1, min(len(widths) - start, cap if fixed else cap // max(1, widths[start])))


def token_cache() -> Path:
    """Where encoded requests are kept between processes: ``cache/tokens`` in chop's home (``CHOP_HOME``)."""
    from chop import assets

    return assets.home() / "cache" / "tokens"


def max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval's HF backend uses: the config's, else the tokenizer's, else 2048."""
    config = model.config.get_text_config()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else DEFAULT_MAX_LENGTH


class Encoder:
    """lm-eval's tokenisation of (context, continuation) pairs; each pair is encoded once and then remembered.

    ``threads``: encode batches in the tokenizer's threads even where ``TOKENIZERS_PARALLELISM=false`` (which many
    set to silence the warning after a fork) would make them serial; for a process that forks no workers afterwards
    (``chop eval``), where it costs half the tokenisation time on 2 cores and more on more. ``cache_dir``: keep the
    encoded pairs on disk between processes, one file per tokenizer (``save``); a pickle chop itself wrote, in chop's
    home (``chop.assets.home()/cache/tokens``). ``shortcut``: encode each context once, and only the rest of context +
    continuation with each continuation, where the tokenizer allows it (``splits_locally``; the same tokens); False:
    every pair whole, as lm-eval. ``self.shortcut`` says whether it is taken (a failed sample check turns it off)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, threads: bool = False,
                 cache_dir: Optional[Path] = None, shortcut: bool = True) -> None:
        self.tokenizer, self.threads = tokenizer, threads
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode(self.prefix_id)
        rust = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core: its JSON definition
        self._definition = rust.to_str() if rust is not None else None
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._cache = self._cache_file(cache_dir) if cache_dir is not None else None
        if self._cache is not None and self._cache.exists():
            try:
                with open(self._cache, "rb") as f:
                    cached = pickle.load(f)
                if not isinstance(cached, dict):
                    raise TypeError(f"holds a {type(cached).__name__}, not a dict of pairs")
                self._pairs.update(cached)
            except Exception as e:  # truncated, damaged, foreign: rebuilt (the next save replaces it), never trusted
                log.warning("token cache %s unreadable (%s): tokenising afresh", self._cache, e)
        self._cached = len(self._pairs)
        self.shortcut = shortcut and self._definition is not None and splits_locally(self._definition)
        added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None

    def _cache_file(self, cache_dir: Path) -> Optional[Path]:
        """The cache of this tokenizer's pairs: named by a hash of everything that decides its tokens (the fast
        tokenizer's whole definition and the prefix token); None for a tokenizer without one (slow tokenizers)."""
        if self._definition is None:
            return None
        key = hashlib.sha256(f"{CACHE_VERSION}\0{type(self.tokenizer).__name__}\0{self.prefix_id}\0{self._definition}"
                             .encode())
        return Path(cache_dir) / f"{key.hexdigest()[:32]}.pkl"

    def save(self) -> None:
        """Write the pairs encoded so far to the cache (when there is one and it gained any), atomically: the next
        process with this tokenizer then tokenises only what it has not seen (lm-eval's ``--cache_requests``)."""
        if self._cache is None or len(self._pairs) == self._cached:
            return
        self._cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self._pairs, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self._cache)
        self._cached = len(self._pairs)

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
        new = list(dict.fromkeys(r for r in requests if r not in self._pairs))
        if not new:  # all encoded before (in this process, or in the cache)
            return [self._pairs[r] for r in requests]
        split = []
        for context, continuation in new:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((context, continuation))
        done = self._by_tails(split) if self.shortcut else {}
        texts = sorted({t for c, x in split if c and (c, x) not in done for t in (c, c + x)})
        ids = dict(zip(texts, self._encode_many(texts)))
        for request, (context, continuation) in zip(new, split):
            if not context:
                self._pairs[request] = ([self.prefix_id], self.encode(continuation))
            elif (context, continuation) in done:
                self._pairs[request] = done[context, continuation]
            else:
                ctx = ids[context]
                self._pairs[request] = (ctx, ids[context + continuation][len(ctx):])
        return [self._pairs[r] for r in requests]

    def _by_tails(self, split: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
        """The pairs whose whole encoding can be had without encoding the context twice (``splits_locally``): the
        context's tokens up to its last piece, then the encoding of the rest of context + continuation (a piece
        starts afresh where the one before it ended). lm-eval encodes the context once alone and once with each
        continuation; this encodes it once. Pairs holding special tokens' text, or starting with the prefix token,
        are left to the whole encoding; a sample is checked against it, and a difference turns this off."""
        rust = self.tokenizer.backend_tokenizer
        usable = [(c, x) for c, x in split if c and not c.startswith(self._prefix_text)
                  and not (self._added and self._added.search(c + x))]
        contexts = sorted({c for c, _ in usable})
        with self._in_threads():
            encodings = rust.encode_batch(contexts, add_special_tokens=True)
        firsts = {}  # context: its tokens and the first token of its last piece
        for context, e in zip(contexts, encodings):
            ids = e.ids  # a new list at each access
            word = e.token_to_word(len(ids) - 1) if ids else None
            if word is not None:  # else it ends in a special token (a template appends one): encoded whole
                firsts[context] = (ids, e.word_to_tokens(word)[0])
        # Where the last piece starts: the length of the text the tokens before it decode to (the encodings' character
        # offsets will not do: a byte-level post-processor trims the piece's leading space from them), if it is the
        # context's own beginning (it is, for a byte-level BPE).
        with self._in_threads():
            before = rust.decode_batch([ids[:first] for ids, first in firsts.values()], skip_special_tokens=True)
        cut = {c: (ids, first, len(text)) for (c, (ids, first)), text in zip(firsts.items(), before)
               if c.startswith(text)}  # context: its tokens, first token and character of its last piece
        tail = {(c, x): c[cut[c][2]:] + x for c, x in usable if c in cut}  # from the context's last piece on
        texts = sorted(set(tail.values()))
        with self._in_threads():
            tail_ids = dict(zip(texts, (e.ids for e in rust.encode_batch(texts, add_special_tokens=False))))
        # lm-eval's continuation: the whole encoding past the context's own tokens, i.e. the tail's past the
        # context's tokens from its last piece on
        done = {(c, x): (cut[c][0], tail_ids[t][len(cut[c][0]) - cut[c][1]:]) for (c, x), t in tail.items()}
        sample = list(tail)[::max(1, -(-len(tail) // 64))]  # at most 64 pairs
        if any(cut[c][0][:cut[c][1]] + tail_ids[tail[c, x]] != w
               for (c, x), w in zip(sample, self._encode_many([c + x for c, x in sample]))):
            log.warning("tokenizer %s: encoding each context once gave other tokens than encoding it with its "
                        "continuation; encoding every pair whole from now on", type(self.tokenizer).__name__)
            self.shortcut = False
            return {}
        return done

    def _in_threads(self) -> Any:
        """The context a batch call runs in: the tokenizer's threads on when ``threads``, else the environment's."""
        return _tokenizer_threads() if self.threads else nullcontext()

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        plain = [t for t in texts if not t.startswith(self._prefix_text)]
        if self._definition is not None:  # a fast tokenizer: its Rust core, in threads
            with self._in_threads():
                ids = [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(plain, add_special_tokens=True)]
        else:
            ids = self.tokenizer(plain)["input_ids"] if plain else []
        encoded = dict(zip(plain, ids))
        return [encoded[t] if t in encoded else self.encode(t) for t in texts]


# What would make a piece's tokens depend on the text before it: lookbehind, anchors, word boundaries.
_CONTEXT_SENSITIVE = re.compile(r"\(\?<[=!]|\\[bBGAzZ]|(?<![\[\\])\^|(?<!\\)\$")


def splits_locally(definition: str) -> bool:
    """Whether a fast tokenizer (its JSON ``definition``) encodes text as a sequence of pieces, each encoded alone and
    each found from where the one before it ended: no normaliser, byte-level BPE without dropout, and a pre-tokenizer
    of regular expressions without lookbehind or anchors (GPT-2's, Llama 3's, Qwen's, SmolLM's). Then the tokens of
    context + continuation are the context's up to its last piece and the encoding of the rest."""
    spec = json.loads(definition)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if not _no_op(spec.get("normalizer")) or model.get("type") != "BPE" or model.get("dropout"):
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                return False
        elif step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex")
            if (pattern is None or step.get("behavior") != "Isolated" or step.get("invert")
                    or _CONTEXT_SENSITIVE.search(pattern)):
                return False
        else:
            return False
    return any(step.get("type") == "ByteLevel" for step in steps)


def _no_op(normalizer: Optional[dict]) -> bool:
    """Whether a normaliser changes nothing: none, or a sequence of none (transformers' GGUF conversion writes an
    empty one)."""
    return normalizer is None or (normalizer.get("type") == "Sequence"
                                  and all(_no_op(n) for n in normalizer.get("normalizers", [])))


@contextmanager
def _tokenizer_threads() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=true`` for the duration (the tokenizers library reads it at each batch call)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


class Scorer:
    """Scores requests against ``model`` as lm-eval's ``--model hf`` does, with the same numbers, faster.

    ``batch_size``: rows per batch, as lm-eval's (the same batches: the same bits on any hardware), or ``auto``:
    length-sorted rows packed up to a number of tokens (``_token_budget``), which gives the same bits where kernels
    do not depend on the batch's shape (an H100 measured; CPU kernels do). ``share_contexts``: one row per context
    with a segment per continuation (half the tokens; numbers equal lm-eval's to the dtype's rounding, not bit for
    bit); models whose attention takes no such mask (sliding windows, flash-attention-2) keep one row per input.
    ``encoder``: the tokenisation to use, with what it has already encoded (the callback keeps one across runs).
    ``sharded``: for a model sharded across ranks (FSDP), a function that runs ``fn(*args)`` inside the sharded
    root's forward (which gathers the weights outside the layers); every rank must then score the same requests.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: Union[int, str] = "auto", max_len: Optional[int] = None,
                 share_contexts: bool = False, encoder: Optional[Encoder] = None,
                 sharded: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size: {batch_size!r} must be a positive integer or 'auto'")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_len = max_len or max_length(model, tokenizer)
        self.encoder = encoder or Encoder(tokenizer)
        self.head = output_head(model)
        self.sharded = sharded
        # An integer batch size lowered after running out of memory: the smallest it went to (None: never). Its
        # batches are then not lm-eval's, and neither need its bf16 bits be.
        self.lowered: Optional[int] = None
        config = model.config.get_text_config()
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        # Shared rows restart each continuation's positions: models that take none (ALiBi: BLOOM) cannot.
        body = model.base_model
        positional = "position_ids" in inspect.signature(getattr(body, "forward", body)).parameters
        maskable = not sliding and positional and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        self.share = share_contexts and maskable

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding would produce it) per request."""
        return self.score_tokens(self.encoder.encode_pairs(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length, each token predicted once with
        as much context as fits (lm-eval's rolling windows, context length 1)."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for ctx, cont in rolling_windows(self.encoder.encode(text), self.encoder.prefix_id, self.max_len):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += ll
        return totals

    def rows(self, pairs: Sequence[tuple[list[int], list[int]]]
             ) -> tuple[dict[tuple[int, ...], tuple[tuple[int, ...], list[tuple[int, list[int]]]]],
                        dict[tuple[int, ...], int]]:
        """The rows the model runs, by stem: (stem, [(request index, continuation tokens), ...]), and each row's
        longest context + continuation before truncation (lm-eval's sort key). A row's stem is the input up to the
        last context token when contexts are shared (each continuation then gets a segment holding its tokens but the
        last, which is only predicted), else the whole input, context and continuation but its last token, in which
        every continuation token is predicted."""
        rows: dict[tuple[int, ...], tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = {}
        total: dict[tuple[int, ...], int] = {}
        for i, (ctx, cont) in enumerate(pairs):
            full = (ctx + cont)[-(self.max_len + 1):]  # as lm-eval: at most max_len inputs, cut from the left
            n = min(len(cont), len(full) - 1)
            stem = tuple(full[:len(full) - n] if self.share else full[:-1])
            rows.setdefault(stem, (stem, []))[1].append((i, full[len(full) - n:]))
            total[stem] = max(total.get(stem, 0), len(ctx) + len(cont))
        return rows, total

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows, total = self.rows(pairs)
        rank, world = _dist()
        width = {k: self.row_width(*row) for k, row in rows.items()}
        order = sorted(rows, key=lambda k: (-width[k], -total[k], k))  # lm-eval's order: longest first
        done: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        mine = [rows[k] for k in order[rank::world]]
        widths = [width[k] for k in order[rank::world]]
        # An integer batch size is lm-eval's, that many rows a batch; auto packs rows up to a number of tokens.
        fixed = self.batch_size != "auto"
        start, cap = 0, self.batch_size if fixed else self._token_budget(widths[0] if mine else 1)

        def size(start: int) -> int:
            return rows_in_batch(widths, start, cap, fixed)

        if self.sharded is not None:
            # Forwards are collective: every rank runs as many batches as the busiest (padding with a one-token
            # row), so each rank plans its batches first; an out-of-memory batch cannot be retried alone.
            cap = self._across_ranks(cap, torch.distributed.ReduceOp.MIN)
            plan = []
            while start < len(mine):
                plan.append((start, size(start)))
                start += plan[-1][1]
            for k in range(self._across_ranks(len(plan), torch.distributed.ReduceOp.MAX)):
                if k < len(plan):
                    done.append(self._score_batch(mine[plan[k][0]:sum(plan[k])]))
                else:
                    self._score_batch([((self.encoder.prefix_id,), [(-1, [self.encoder.prefix_id])])])
        while start < len(mine):
            n = size(start)
            try:
                done.append(self._score_batch(mine[start:start + n]))
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                cap = max(1, cap // 2)  # too generous a guess: halve it and try this batch again
                torch.cuda.empty_cache()
                if fixed:
                    self.lowered = cap if self.lowered is None else min(self.lowered, cap)
                    log.warning("batch_size %d: out of GPU memory in a batch of %d rows of up to %d tokens; going on "
                                "with %d rows a batch, so the numbers may differ from lm-eval's at batch size %d by "
                                "rounding (free GPU memory to keep them)",
                                self.batch_size, n, widths[start], cap, self.batch_size)
                continue
            start += n
        # Read back once at the end: a read per batch would stall the host while the GPU runs, instead of letting it
        # prepare the next batches.
        scores: dict[int, tuple[float, bool]] = {}
        if done:
            ll, hit = (torch.cat([d[k] for d in done]).tolist() for k in (1, 2))
            scores = dict(zip(chain.from_iterable(d[0] for d in done), zip(ll, hit)))
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, scores)
            scores = {k: v for part in gathered for k, v in part.items()}
        return [scores[i] for i in range(len(pairs))]

    def _across_ranks(self, n: int, op: Any) -> int:
        """``n`` reduced by ``op`` over the ranks (e.g. the smallest batch cap: free memory differs a little)."""
        t = torch.tensor([n], device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return int(t.item())

    def row_width(self, stem: tuple[int, ...], conts: list[tuple[int, list[int]]]) -> int:
        """Tokens a row feeds the model: its stem, and with shared contexts each continuation's segment."""
        return len(stem) + (sum(len(c) - 1 for _, c in conts) if self.share else 0)

    def _token_budget(self, longest: int) -> int:
        """Tokens per batch with ``batch_size`` auto: on GPU what half the free memory holds of one layer's
        activations in bf16 (inference keeps one layer's at a time), at most ``MAX_BATCH_TOKENS``; CPU: 32 rows."""
        if self.device.type != "cuda":
            return 32 * longest
        config = self.model.config.get_text_config()
        inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
        per_token = 2 * (3 * inter + 8 * config.hidden_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(longest, min(MAX_BATCH_TOKENS, int(0.5 * free / per_token)))

    def _score_batch(self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]
                     ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Scores of one batch of rows, (stem tokens, [(request index, continuation tokens), ...]): the request
        indices, their log-likelihoods and whether greedy decoding gives the continuation, on the device."""
        device = self.device
        requests = [i for _, conts in batch for i, _ in conts]
        counts = np.array([len(conts) for _, conts in batch], dtype=np.int64)
        n_cont = np.fromiter((len(c) for _, conts in batch for _, c in conts), dtype=np.int64, count=len(requests))
        stem = np.fromiter((len(s) for s, _ in batch), dtype=np.int64, count=len(batch))
        # Of a continuation's tokens, the first `inside` are predicted in the stem (its last positions): all of them
        # when rows are inputs, the first alone when contexts are shared; the rest in the continuation's segment.
        inside = n_cont if not self.share else np.ones_like(n_cont)
        # A row's pieces: its stem, then a segment per continuation (empty without shared contexts). Per piece:
        # length, offset within its row, the position of its first token (continuing the stem), segment id.
        first = np.arange(len(batch)) + np.cumsum(counts) - counts
        is_stem = np.zeros(len(batch) + len(requests), dtype=bool)
        is_stem[first] = True
        length = np.empty(len(is_stem), dtype=np.int64)
        length[is_stem], length[~is_stem] = stem, n_cont - inside
        start = np.cumsum(length) - length
        offset = start - np.repeat(start[first], counts + 1)
        pos0 = np.where(is_stem, 0, np.repeat(stem, counts + 1))
        segment_id = np.where(is_stem, 0, np.cumsum(~is_stem))
        row_len = np.add.reduceat(length, first)
        fill = np.arange(int(row_len.max())) < row_len[:, None]  # row-major: each row's tokens, then padding
        ids = np.zeros(fill.shape, dtype=np.int64)
        k_of = iter(inside.tolist())
        pieces = chain.from_iterable(chain((s,), (c[next(k_of) - 1:-1] for _, c in conts)) for s, conts in batch)
        ids[fill] = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=int(length.sum()))
        # Continuation token j is predicted at the stem's position (length - inside + j) while j < inside, else at
        # its segment's token j - inside.
        row_of = np.repeat(np.arange(len(batch)), counts)
        j = np.arange(int(n_cont.sum())) - np.repeat(np.cumsum(n_cont) - n_cont, n_cont)
        rows, ins = np.repeat(row_of, n_cont), np.repeat(inside, n_cont)
        cols = np.where(j < ins, np.repeat(stem[row_of] - inside, n_cont) + j, np.repeat(offset[~is_stem], n_cont) + j - ins)
        target = np.fromiter(chain.from_iterable(c for _, conts in batch for _, c in conts), dtype=np.int64,
                             count=len(rows))
        owner = np.repeat(np.arange(len(requests)), n_cont)
        kwargs = {}
        if (np.add.reduceat((~is_stem & (length > 0)).astype(np.int64), first) > 1).any():  # rows of 2+ segments
            position, segment = np.zeros_like(ids), np.zeros_like(ids)
            position[fill] = np.repeat(pos0 - start, length) + np.arange(int(length.sum()))
            segment[fill] = np.repeat(segment_id, length)
            kwargs = {"position_ids": self._to_device(position),
                      "attention_mask": self._segment_mask(self._to_device(segment))}
        rows_t, cols_t, target, owner_t = (self._to_device(x) for x in (rows, cols, target, owner))
        ids_t = self._to_device(ids)
        # No gradients: inference mode, but not for a sharded model (FSDP writes its gathered weights in place).
        with torch.no_grad() if self.sharded is not None else torch.inference_mode():
            if self.sharded is not None:
                lp, miss = self.sharded(self._token_scores, ids_t, kwargs, rows_t, cols_t, target)
            else:
                lp, miss = self._token_scores(ids_t, kwargs, rows_t, cols_t, target)
            n = len(requests)
            # lm-eval sums a request's log-probabilities in their dtype: the sum rounded to it.
            ll = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, owner_t, lp.double()).to(lp.dtype)
            miss = torch.zeros(n, device=device).index_add_(0, owner_t, miss)
        return requests, ll, miss == 0

    def _token_scores(self, ids: torch.Tensor, kwargs: dict, rows: torch.Tensor, cols: torch.Tensor,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's part of a batch: each target token's log-probability at (row, col), and 1 where greedy
        decoding would not give it."""
        # Exact mode: the attention kernel lm-eval's forward gets (cuDNN's on an H100), for its bits.
        with sdpa_kernel(ATTENTION_BACKENDS) if self.share else nullcontext():
            hidden = self.model.base_model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
        picked = hidden[rows, cols]
        logp, misses = [], []
        for i in range(0, len(target), HEAD_CHUNK):  # bounded memory: the logits of HEAD_CHUNK positions at a time
            # In the model's dtype, as lm-eval: its log-softmax rounds to it, and its greedy check is on the result.
            logits = F.log_softmax(self.head(picked[i:i + HEAD_CHUNK]), dim=-1)
            t = target[i:i + HEAD_CHUNK]
            logp.append(logits.gather(1, t[:, None])[:, 0])
            misses.append((logits.argmax(-1) != t).float())
        return torch.cat(logp), torch.cat(misses)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device; from pinned memory on GPU, so the copy does not wait for the GPU."""
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        return torch.from_numpy(array).pin_memory().to(self.device, non_blocking=True)

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
