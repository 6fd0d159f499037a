"""Run tasks against a model: build each task's requests, score them all in one sorted stream, compute the metrics
as lm-evaluation-harness defines them (acc, acc_norm by the choice's character length, standard errors)."""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chop.eval.engine import Scorer
from chop.eval.tasks import BLOCK_LEN, N_BLOCKS, Doc, Task, get, load_docs, stream_texts
from chop.models.perplexity import token_perplexity


@dataclass
class TaskResult:
    task: str
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    samples: list[dict[str, Any]]  # per document: the log-likelihoods (and greedy flags) behind the metrics


def requests_of(task: Task, doc: Doc) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval builds for one document, zero-shot."""
    prefix = task.description(doc)
    if task.kind == "loglikelihood":
        return [(prefix + task.text(doc), task.target(doc))]
    if task.multiple_input:
        return [(prefix + ctx, task.target_delimiter + task.target(doc)) for ctx in task.choices(doc)]
    return [(prefix + task.text(doc), task.target_delimiter + choice) for choice in task.choices(doc)]


def scored_pairs(tasks: list[Task], docs_of: Callable[[Task], list[Doc]]) -> list[tuple[str, str]]:
    """Every (context, continuation) pair the tasks ask to score, from each task's documents (``docs_of``): what
    tokenising a suite means (perplexity and block tasks make none)."""
    return [r for t in tasks if t.kind in ("multiple_choice", "loglikelihood") for doc in docs_of(t)
            for r in requests_of(t, doc)]


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off: a run makes millions of small objects (documents, token lists, rows) and
    almost no cycles, and the collector's passes over them nearly doubled the time to plan the batches; what it
    would free, it frees after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@no_gc()
def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Union[str, list[str]],
             limit: Optional[int] = None, batch_size: Union[int, str] = "auto", data_dir: Optional[str] = None,
             scorer: Optional[Scorer] = None, docs: Optional[dict[str, list[Doc]]] = None) -> dict[str, TaskResult]:
    """Scores of ``model`` on ``tasks`` (names, or the groups ``just_chop``/``suite``), first ``limit`` documents each.

    ``docs``: documents already loaded, by task name (the callback loads them once per run).
    """
    scorer = scorer or Scorer(model, tokenizer, batch_size)
    chosen = get(tasks)
    docs = dict(docs or {})
    for t in chosen:
        if t.name not in docs:
            docs[t.name] = block_docs(t, scorer, data_dir, limit) if t.kind == "blocks" else load_docs(t, data_dir, limit)
    pairs, owner = [], []
    texts, text_owner = [], []
    blocks, block_owner = [], []
    for task in chosen:
        for i, doc in enumerate(docs[task.name]):
            if task.kind == "blocks":
                blocks.append((doc["tokens"][:1], doc["tokens"][1:]))
                block_owner.append((task.name, i))
            elif task.kind == "perplexity":
                texts.append(task.text(doc))
                text_owner.append((task.name, i))
            else:
                for r in requests_of(task, doc):
                    pairs.append(r)
                    owner.append((task.name, i))
    scores = scorer.loglikelihood(pairs)
    rolled = scorer.loglikelihood_rolling(texts) if texts else []
    per_doc: dict[tuple[str, int], list] = {}
    for key, s in zip(owner, scores):
        per_doc.setdefault(key, []).append(s)
    for key, ll in zip(text_owner, rolled):
        per_doc[key] = [(ll, False)]
    for key, s in zip(block_owner, scorer.score_tokens(blocks) if blocks else []):
        per_doc[key] = [s]
    return {t.name: _metrics(t, docs[t.name], [per_doc[(t.name, i)] for i in range(len(docs[t.name]))]) for t in chosen}


def block_docs(task: Task, scorer: Scorer, data_dir: Optional[str] = None, limit: Optional[int] = None) -> list[Doc]:
    """The first ``limit`` (default 256) blocks of ``BLOCK_LEN`` tokens (at most the model's context) of the task's
    texts, packed with EOS between documents as chop's training validation packs them."""
    from chop.data.text import pack_blocks

    length = min(BLOCK_LEN, scorer.max_len)
    blocks = pack_blocks(stream_texts(task, data_dir), scorer.tokenizer, length + 1, limit or N_BLOCKS)
    if not blocks:
        raise ValueError(f"task '{task.name}': its texts hold no full block of {length + 1} tokens")
    return [{"tokens": b.tolist()} for b in blocks]


def _stderr(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _metrics(task: Task, docs: list[Doc], scores: list[list[tuple[float, bool]]]) -> TaskResult:
    samples: list[dict[str, Any]] = []
    if task.kind == "multiple_choice":
        acc, acc_norm = [], []
        for doc, s in zip(docs, scores):
            lls = np.array([ll for ll, _ in s])
            choices = task.choices(doc)
            gold = task.text(doc) if task.multiple_input else task.target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else int(gold)
            lengths = np.array([float(len(c)) for c in choices])
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / lengths) == gold))
            samples.append({"lls": lls.tolist(), "gold": gold})
        values = {"acc": acc, "acc_norm": acc_norm}
        metrics = {m: float(np.mean(values[m])) for m in task.metrics}
        return TaskResult(task.name, len(docs), metrics, {m: _stderr(values[m]) for m in task.metrics}, samples)
    if task.kind == "blocks":
        lls = [s[0][0] for s in scores]
        n_tokens = sum(len(d["tokens"]) - 1 for d in docs)
        return TaskResult(task.name, len(docs), {"perplexity": token_perplexity(-sum(lls), n_tokens)}, {},
                          [{"ll": ll} for ll in lls])
    if task.kind == "loglikelihood":
        lls = [s[0][0] for s in scores]
        greedy = [float(s[0][1]) for s in scores]
        samples = [{"ll": ll, "greedy": bool(g)} for ll, g in zip(lls, greedy)]
        metrics = {"perplexity": math.exp(-float(np.mean(lls))), "acc": float(np.mean(greedy))}
        return TaskResult(task.name, len(docs), metrics, {"acc": _stderr(greedy)}, samples)
    lls = [s[0][0] for s in scores]
    words = sum(len(re.split(r"\s+", task.target(d))) for d in docs)  # counted in the raw text, as lm-eval
    n_bytes = sum(len(task.target(d).encode("utf-8")) for d in docs)
    total = sum(lls)
    metrics = {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / n_bytes),
               "bits_per_byte": -total / n_bytes / math.log(2)}
    return TaskResult(task.name, len(docs), metrics, {}, [{"ll": ll} for ll in lls])


def average(results: dict[str, TaskResult]) -> Optional[float]:
    """Mean accuracy over the tasks: acc_norm where a task reports it (as Just CHOP does), else acc."""
    accs = [r.metrics.get("acc_norm", r.metrics.get("acc")) for r in results.values()]
    accs = [a for a in accs if a is not None]
    return float(np.mean(accs)) if accs else None


def table(results: dict[str, TaskResult]) -> str:
    """A markdown table like lm-eval's."""
    lines = ["|Tasks|n|Metric|Value|Stderr|", "|---|---:|---|---:|---:|"]
    for r in results.values():
        for i, (m, v) in enumerate(r.metrics.items()):
            err = r.stderr.get(m)
            lines.append(f"|{r.task if i == 0 else ''}|{r.n if i == 0 else ''}|{m}|{v:.4f}|"
                         f"{'' if err is None or math.isnan(err) else f'± {err:.4f}'}|")
    avg = average(results)
    if avg is not None:
        lines.append(f"|average|||{avg:.4f}||")
    return "\n".join(lines)


def to_json(results: dict[str, TaskResult], samples: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"results": {k: {**r.metrics, **{f"{m}_stderr": e for m, e in r.stderr.items()}, "n": r.n}
                                       for k, r in results.items()}, "average": average(results)}
    if samples:
        out["samples"] = {k: r.samples for k, r in results.items()}
    return out
