"""How far a faster way of scoring is from the float32 truth, against how far lm-eval's own bf16 numbers are: per task,
the distribution of |Δ log-likelihood| (every choice of every document) and the accuracy difference. The fast mode is
admissible for a task when it is not measurably further than bf16: per document, how much further its log-likelihoods
are from float32 than bf16's (Σ over choices of |Δ fast| − |Δ bf16|), averaged over the documents, is at most two
standard errors of that mean above zero. Both are bf16 rounding by other routes, so a rule that the fast run's median
be no larger than bf16's (the first one here) fails about half the tasks by chance alone."""

from __future__ import annotations

from typing import Any

import numpy as np


def documents(result: dict[str, Any], task: str) -> list[list[float]]:
    """Each document's log-likelihoods of ``task`` in a ``chop eval`` JSON written with ``samples``: one per choice,
    or the one continuation's (LAMBADA)."""
    samples = result.get("samples", {}).get(task)
    if samples is None:
        raise ValueError(f"agreement: the results hold no samples of '{task}'; run chop eval with --samples true")
    return [s["lls"] if "lls" in s else [s["ll"]] for s in samples]


def lls(result: dict[str, Any], task: str) -> np.ndarray:
    """Every log-likelihood of ``task``, in document order."""
    return np.array([ll for doc in documents(result, task) for ll in doc], dtype=np.float64)


def distance(truth: dict[str, Any], other: dict[str, Any], task: str) -> dict[str, float]:
    """|Δ log-likelihood| of ``other`` against ``truth`` on ``task`` (median, 99th percentile, max) and the difference
    of its headline accuracy (acc_norm where reported, else acc)."""
    a, b = lls(truth, task), lls(other, task)
    if a.shape != b.shape:
        raise ValueError(f"agreement: '{task}' has {a.size} log-likelihoods in one run and {b.size} in the other; "
                         f"compare runs of the same documents (the same --limit)")
    delta = np.abs(a - b)
    metric = lambda r: r["results"][task].get("acc_norm", r["results"][task].get("acc"))  # noqa: E731
    acc = None if metric(truth) is None else float(metric(other) - metric(truth))
    return {"median": float(np.median(delta)), "p99": float(np.percentile(delta, 99)), "max": float(delta.max()),
            "acc_diff": acc}


def excess(truth: dict[str, Any], fast: dict[str, Any], bf16: dict[str, Any], task: str) -> dict[str, float]:
    """How much further ``fast`` is from ``truth`` than ``bf16`` is, per document (the choices of one document share
    its context, so they are not independent): the mean over documents of Σ |Δ fast| − |Δ bf16|, and its standard
    error."""
    docs = [np.abs(np.subtract(f, t)).sum() - np.abs(np.subtract(b, t)).sum()
            for t, f, b in zip(documents(truth, task), documents(fast, task), documents(bf16, task))]
    d = np.array(docs, dtype=np.float64)
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0}


def compare(truth: dict[str, Any], fast: dict[str, Any], bf16: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the fast run's and the bf16 run's distance from the float32 truth, how much further fast is, and
    whether that is within what chance gives (``within``: the mean excess at most two standard errors above zero)."""
    out = {}
    for task in truth["results"]:
        if task not in truth.get("samples", {}):
            continue  # block perplexity: no per-choice log-likelihoods
        f, b = distance(truth, fast, task), distance(truth, bf16, task)
        more = excess(truth, fast, bf16, task)
        out[task] = {"fast": f, "bf16": b, "excess": more, "within": more["mean"] <= 2 * more["stderr"]}
    return out
