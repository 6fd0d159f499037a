"""How far a faster way of scoring is from the float32 truth, against how far lm-eval's own bf16 numbers are: per task,
the distribution of |Δ log-likelihood| (every choice of every document) and the accuracy difference. The fast mode is
admissible for a task when its median and 99th percentile of |Δ| are no larger than bf16's."""

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


def compare(truth: dict[str, Any], fast: dict[str, Any], bf16: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the fast run's and the bf16 run's distance from the float32 truth, and whether fast is within bf16's."""
    out = {}
    for task in truth["results"]:
        if task not in truth.get("samples", {}):
            continue  # block perplexity: no per-choice log-likelihoods
        f, b = distance(truth, fast, task), distance(truth, bf16, task)
        out[task] = {"fast": f, "bf16": b, "within": f["median"] <= b["median"] and f["p99"] <= b["p99"]}
    return out
