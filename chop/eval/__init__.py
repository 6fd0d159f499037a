"""The zero-shot evaluation suite: tasks as lm-evaluation-harness defines them, a fast batched scorer, a callback."""

from typing import Any

from chop.eval.engine import Scorer
from chop.eval.suite import evaluate
from chop.eval.tasks import TASKS

__all__ = ["TASKS", "Scorer", "ZeroShotEvalCallback", "evaluate"]


def __getattr__(name: str) -> Any:
    # The callback needs Lightning; `chop eval` and the scorer do not.
    if name == "ZeroShotEvalCallback":
        from chop.eval.callback import ZeroShotEvalCallback

        return ZeroShotEvalCallback
    raise AttributeError(f"module 'chop.eval' has no attribute {name!r}")
