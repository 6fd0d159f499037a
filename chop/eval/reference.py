"""lm-evaluation-harness on the same documents as chop, for agreement tests and speed comparisons.

lm-eval reads each task from the hub with ``datasets.load_dataset``; here that call is pointed at the documents chop
loaded (every split lm-eval asks for gets them), so the two score the same rows with lm-eval's own task
definitions. Needs ``lm_eval`` (``pip install lm_eval==0.4.13``); chop itself does not.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import Any, Iterator, Optional

from chop.eval.tasks import get, load_docs


@contextmanager
def lm_eval_reads(tasks: list[str], data_dir: Optional[str] = None, limit: Optional[int] = None) -> Iterator[None]:
    """While open, lm-eval's ``datasets.load_dataset`` of these tasks' datasets returns chop's documents."""
    import datasets

    by_dataset: dict[tuple[str, Optional[str]], Any] = {}
    for task in get(tasks):
        rows = load_docs(task, data_dir, limit)
        if task.name == "hellaswag":  # lm-eval processes the raw rows itself
            rows = [{k: v for k, v in r.items() if k not in ("query", "choices", "gold")} for r in rows]
        groups = {s: [r for r in rows if r["subject"] == s] for s in task.subsets} if task.subsets else {task.config: rows}
        for config, part in groups.items():
            ds = datasets.Dataset.from_list(part)
            by_dataset[(task.path, config)] = datasets.DatasetDict({s: ds for s in ("train", "validation", "test", "dev")})
    real = datasets.load_dataset

    def load(path: str, name: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        return by_dataset[(path, name)] if (path, name) in by_dataset else real(path, name, *args, **kwargs)

    datasets.load_dataset = load
    try:
        yield
    finally:
        datasets.load_dataset = real


@cache
def task_manager() -> Any:
    """lm-eval's index of its task definitions, built once a process: it reads all of its thousands of YAML files
    (17 s on 2 CPUs), which ``simple_evaluate`` would otherwise do again at every call. Without the model's arguments
    as metadata, which ``simple_evaluate`` attaches to the tasks it indexes itself and chop's tasks do not read."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def run_lm_eval(model_dir: str, tasks: list[str], limit: Optional[int] = None, data_dir: Optional[str] = None,
                batch_size: Any = 64, dtype: str = "float32", device: str = "cpu",
                trust_remote_code: bool = False) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with ``--model hf`` on chop's documents; returns its results and samples.
    ``trust_remote_code``: for a model whose layers differ in width (its ``modeling_chop.py``)."""
    import lm_eval

    model_args = f"pretrained={model_dir},dtype={dtype}" + (",trust_remote_code=True" if trust_remote_code else "")
    with lm_eval_reads(tasks, data_dir, limit):
        return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks,
                                       num_fewshot=0, limit=limit, batch_size=batch_size, device=device,
                                       log_samples=True, bootstrap_iters=0, task_manager=task_manager())


def samples_of(result: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """lm-eval's samples of ``task`` in the order chop scores its documents: a group task (MMLU) keeps one list per
    subject, which chop pools in subject order."""
    samples = [s for k, v in result["samples"].items() if k == task or k.startswith(f"{task}_") for s in v]
    if get([task])[0].subsets:
        return sorted(samples, key=lambda s: (s["doc"]["subject"], s["doc_id"]))
    return sorted(samples, key=lambda s: s["doc_id"])
