"""Continued pretraining of a (chopped, pruned) causal LM on the LM loss: the module every chop recipe trains.
Distillation subclasses it and overrides ``training_loss``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torchmetrics import SumMetric

from chop.models.kernels import fused_cross_entropy
from chop.models.perplexity import token_perplexity
from chop.models.registry import head_adjustments
from chop.training.losses import LogitLoss, chunk_for, head_losses
from chop.training.module import CausalLMModule


class ContinuedPretraining(CausalLMModule):
    """Trains all weights of the (chopped, pruned) model on the next-token loss; validation logs ``val/loss`` and
    ``val/ppl`` (token perplexity over the whole validation set).

    Takes every argument of ``CausalLMModule`` (model, chop, pruning, optimizer, ...), plus:

    Args:
        logit_chunk: tokens per chunk in which logits and their losses are computed, so that the full
            ``[tokens, vocab]`` float32 logits never exist at once. Default: 512 MiB of float32 logits per chunk
            (``losses.chunk_for``); 0: all at once.
    """

    def __init__(self, *args: Any, logit_chunk: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if logit_chunk is not None and logit_chunk < 0:
            raise ValueError(f"model.logit_chunk: {logit_chunk} must be >= 0 (0 computes all logits at once)")
        self.logit_chunk = logit_chunk
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()  # summed over batches and ranks

    def configure_model(self) -> None:
        super().configure_model()
        # What liger's fused cross-entropy can compute: a linear head, optionally soft-capped (Gemma); not a scaled
        # one (Cohere), which keeps the chunked path.
        self._softcap, scale = head_adjustments(self.model)
        self._plain_head = isinstance(self.model.get_output_embeddings(), torch.nn.Linear) and scale == 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def logit_losses(self, hidden: torch.Tensor, targets: torch.Tensor, loss: LogitLoss = LogitLoss(),
                     teacher_hidden: Optional[torch.Tensor] = None,
                     teacher_head: Optional[Callable] = None) -> dict[str, torch.Tensor]:
        """``head_losses`` through this model's LM head, in chunks of ``logit_chunk`` tokens; with ``kernels: liger``,
        a training step's cross-entropy alone (no teacher's logits) in liger's fused linear cross-entropy instead."""
        head = self.model.get_output_embeddings()
        if self.kernels == "liger" and teacher_hidden is None and torch.is_grad_enabled() and self._plain_head:
            ce = fused_cross_entropy(hidden, targets, head, self._softcap)
            return {"loss": loss.lm * ce, "lm": ce.detach(), "distill": torch.zeros_like(ce.detach())}
        return head_losses(hidden, targets, self._head, loss, teacher_hidden, teacher_head,
                           params=tuple(p for p in head.parameters() if p.requires_grad), chunk=self.logit_chunk
                           if self.logit_chunk is not None else chunk_for(head.weight.shape[0]))

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one batch; ``loss`` is optimised, every entry is logged as ``train/<key>``."""
        return {"loss": self.logit_losses(self.hidden_states(inputs), targets)["loss"]}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        losses = self.training_loss(ids[:, :-1], ids[:, 1:])
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        loss = self.logit_losses(self.hidden_states(ids[:, :-1]), ids[:, 1:])["lm"]
        self.val_nll.update(loss.float() * ids[:, 1:].numel())
        self.val_tokens.update(ids[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        nll, tokens = float(self.val_nll.compute()), int(self.val_tokens.compute())
        self.val_nll.reset()
        self.val_tokens.reset()
        loss, ppl = nll / tokens, token_perplexity(nll, tokens)
        if self.trainer.sanity_checking:
            # Lightning drops logs of the sanity check; a sanity pass over the whole validation set is the step-0 baseline.
            full = sum(self.trainer.num_sanity_val_batches) == sum(self.trainer.num_val_batches)
            if full and self.global_step == 0 and self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics({"val/loss": loss, "val/ppl": ppl}, step=0)
            return
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)  # already summed over ranks
        self.log("val/ppl", ppl, sync_dist=False)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len``: the trained model's forward and backward (6N + 12 L d s)."""
        return self.model_size.train_flops(seq_len)
