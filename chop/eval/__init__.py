"""The zero-shot evaluation suite: tasks as lm-evaluation-harness defines them and a fast batched scorer (the
callback that runs them during training is ``chop.training.zero_shot.ZeroShotEvalCallback``)."""

from chop.eval.engine import Scorer
from chop.eval.suite import evaluate
from chop.eval.tasks import TASKS

__all__ = ["TASKS", "Scorer", "evaluate"]
