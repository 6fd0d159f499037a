"""The zero-shot evaluation suite: tasks as lm-evaluation-harness defines them, a fast batched scorer, a callback."""

from chop.eval.callback import ZeroShotEvalCallback
from chop.eval.engine import Scorer
from chop.eval.suite import evaluate
from chop.eval.tasks import TASKS

__all__ = ["TASKS", "Scorer", "ZeroShotEvalCallback", "evaluate"]
