"""Zero-shot evaluation inside training: every k steps and/or whenever a checkpoint is saved, on the training devices."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from chop.eval.engine import Encoder, Scorer, token_cache
from chop.eval.suite import average, block_docs, evaluate, to_json
from chop.eval.tasks import Doc, get, load_docs

log = logging.getLogger(__name__)


class ZeroShotEvalCallback(Callback):
    """Runs ``tasks`` on the model being trained; logs ``eval/<task>/<metric>`` and ``eval/average`` to the loggers
    and writes ``eval-step=<N>.json`` beside the checkpoints. Under DDP every rank scores a share of the requests;
    under FSDP too, on the sharded model, each forward run through the sharded root (which gathers its weights).

    Args:
        tasks: task names or groups (``just_chop``, ``suite``), comma-separated.
        every_n_steps: run every this many optimizer steps (None: only at checkpoints).
        on_checkpoint: run whenever a checkpoint is saved.
        limit: the first ``limit`` documents of each task, for quick estimates during training.
        batch_size: rows per batch, as lm-eval's, or ``auto`` (rows packed up to a number of tokens).
        data_dir: a folder with ``<task>/`` files to read instead of the hub.
        share_contexts: score the choices of one context in one row (half the tokens of a multiple-choice task;
            numbers then equal lm-eval's only to the dtype's rounding).
        at_start: also run before the first training step (step 0: the chopped or pruned model before any recovery;
            a resumed run does not repeat it).
        at_end: also run when training ends (the recovered model).
    """

    def __init__(self, tasks: str = "just_chop", every_n_steps: Optional[int] = None, on_checkpoint: bool = True,
                 limit: Optional[int] = None, batch_size: Union[int, str] = "auto",
                 data_dir: Optional[str] = None, share_contexts: bool = False, at_start: bool = False,
                 at_end: bool = False) -> None:
        get(tasks)  # unknown names fail when the config is read
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ZeroShotEvalCallback.every_n_steps: {every_n_steps} must be >= 1 (or null)")
        self.tasks, self.every_n_steps, self.on_checkpoint = tasks, every_n_steps, on_checkpoint
        self.limit, self.batch_size, self.data_dir = limit, batch_size, data_dir
        self.share_contexts, self.at_start, self.at_end = share_contexts, at_start, at_end
        self.docs: Optional[dict[str, list[Doc]]] = None
        self.last_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.docs is None:  # before the first step, so that missing data fails early
            from chop.models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(pl_module.tokenizer_name)
            # Keeps each request's tokens from one evaluation to the next, and (on disk) from one run to the next.
            self.encoder = Encoder(self.tokenizer, cache_dir=token_cache())
            self.docs = {t.name: load_docs(t, self.data_dir, self.limit) for t in get(self.tasks) if t.kind != "blocks"}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_end:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.on_checkpoint:
            self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> Optional[dict]:
        step = trainer.global_step
        if step == self.last_step:  # a checkpoint at a step that was just evaluated
            return None
        self.last_step = step
        # a line in the log before and after: a progress bar is not redrawn while this runs, so a run evaluating
        # would otherwise look stuck at its last training step
        rank_zero_info(f"zero-shot evaluation at step {step}: {self.tasks}")
        began = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context(), torch.no_grad():
                scorer = Scorer(pl_module.model, self.tokenizer, self.batch_size, share_contexts=self.share_contexts,
                                encoder=self.encoder, sharded=_through_sharded_root(trainer, pl_module))
                for task in get(self.tasks):  # blocks need the tokenizer: packed at the first run, then kept
                    if task.name not in self.docs:
                        self.docs[task.name] = block_docs(task, scorer, self.data_dir, self.limit)
                results = evaluate(pl_module.model, self.tokenizer, self.tasks, scorer=scorer, docs=self.docs)
        finally:
            pl_module.train(was_training)
        metrics = {f"eval/{name}/{m}": v for name, r in results.items() for m, v in r.metrics.items()}
        avg = average(results)
        if avg is not None:
            metrics["eval/average"] = avg
        rank_zero_info(f"zero-shot evaluation at step {step}: done in {time.perf_counter() - began:.0f} s"
                       + (f", average {avg:.4f}" if avg is not None else ""))
        if trainer.is_global_zero:
            self.encoder.save()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._write(trainer, {"step": step, "tasks": self.tasks, "limit": self.limit, **to_json(results),
                                  "batch_size_lowered_to": scorer.lowered})  # rank 0's: out of memory, it went on
        return metrics

    def _write(self, trainer: Any, out: dict) -> None:
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path, version = folder / f"eval-step={out['step']}.json", 0
        while path.exists():  # never over an earlier result (a resumed run repeats its step)
            version += 1
            path = folder / f"eval-step={out['step']}-v{version}.json"
        path.write_text(json.dumps(out, indent=2))


def _through_sharded_root(trainer: Any, pl_module: Any) -> Optional[Callable]:
    """Under FSDP, a function that runs ``fn(*args)`` inside the root unit's forward, as Lightning runs a training
    step: the weights outside the decoder layers (embeddings, final norm, head) are gathered only there."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None

    def run(fn: Callable, *args: Any) -> Any:
        pl_module.__dict__["_zero_shot_forward"] = fn
        try:
            return _ForwardRedirection()(trainer.model, pl_module, "_zero_shot_forward", *args)
        finally:
            del pl_module.__dict__["_zero_shot_forward"]

    return run
