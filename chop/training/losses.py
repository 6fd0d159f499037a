"""Losses on the output vocabulary, computed in chunks of tokens so that no full ``[tokens, vocab]`` logits exist.

``head_losses`` runs the LM head and the loss one chunk at a time and, while it has a chunk's logits, also takes
that chunk's gradient (w.r.t. the hidden states and the head's weights); backward then only scales what was
stored. Peak memory is one chunk's logits whatever the vocabulary and sequence, at no recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Float32 for the softmax of bf16/fp16 logits; float64 stays (the tests check gradients in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Summed over tokens: KL(teacher||student) (``forward_kl``), KL(student||teacher) or their Jensen-Shannon
    divergence, of the distributions at ``temperature``, times T² so that gradients keep their size as T grows."""
    log_s = F.log_softmax(_wide(student) / temperature, dim=-1)
    log_t = F.log_softmax(_wide(teacher) / temperature, dim=-1)
    if kind == "forward_kl":
        d = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    elif kind == "reverse_kl":
        d = F.kl_div(log_t, log_s, log_target=True, reduction="sum")
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2)
        d = 0.5 * (F.kl_div(log_m, log_s, log_target=True, reduction="sum")
                   + F.kl_div(log_m, log_t, log_target=True, reduction="sum"))
    else:
        raise ValueError(f"divergence: '{kind}' is not one of {list(DIVERGENCES)}")
    return d * temperature**2


@dataclass
class LogitLoss:
    """What is computed on the logits of each token: LM cross-entropy and, with a teacher, a divergence from it.

    Each term is summed over tokens here; ``head_losses`` divides by the token count.
    """

    lm: float = 1.0
    distill: float = 0.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    vocab: Optional[int] = None  # compare only the first ``vocab`` logits (the vocabulary both models share)

    def terms(self, student: torch.Tensor, teacher: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """[lm cross-entropy, divergence] summed over the chunk's tokens (divergence 0 without a teacher)."""
        ce = F.cross_entropy(_wide(student), targets, reduction="sum")
        if teacher is None or not self.distill:
            return torch.stack([ce, ce.new_zeros(())])
        v = self.vocab or min(student.shape[-1], teacher.shape[-1])
        return torch.stack([ce, divergence(student[..., :v], teacher[..., :v], self.divergence, self.temperature)])

    def weighted(self, terms: torch.Tensor) -> torch.Tensor:
        return self.lm * terms[0] + self.distill * terms[1]


class _ChunkedHeadLoss(torch.autograd.Function):
    """(weighted loss, [lm, divergence]) per token; the gradient is taken in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, targets, teacher_hidden, student_head, teacher_head, loss, chunk, grad, *params):  # type: ignore[override]
        n = targets.numel()
        totals = torch.zeros(2, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.empty_like(hidden) if grad else None
        grad_p: list[Optional[torch.Tensor]] = [None] * len(params)
        for i in range(0, n, chunk):
            h = hidden[i:i + chunk].detach().requires_grad_(grad)
            with torch.no_grad():
                t = teacher_head(teacher_hidden[i:i + chunk]) if teacher_hidden is not None else None
            with torch.set_grad_enabled(grad):
                terms = loss.terms(student_head(h), t, targets[i:i + chunk])
                total = loss.weighted(terms) / n  # the mean's gradient directly: no pass over it to rescale
            if grad:
                g = torch.autograd.grad(total, [h, *params], allow_unused=True)
                grad_h[i:i + chunk] = g[0]
                for k, gp in enumerate(g[1:]):
                    if gp is not None:
                        grad_p[k] = gp if grad_p[k] is None else grad_p[k].add_(gp)
            totals += terms.detach()
        totals /= n
        if grad:
            ctx.grad_h = grad_h
            ctx.grad_p = [torch.zeros_like(p) if gp is None else gp for gp, p in zip(grad_p, params)]
        ctx.mark_non_differentiable(totals)
        return loss.weighted(totals), totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):  # type: ignore[override]
        grads = [g.mul_(grad_loss.to(g.dtype)) for g in (ctx.grad_h, *ctx.grad_p)]  # in place: each is used once
        return (grads[0], None, None, None, None, None, None, None, *grads[1:])


def chunk_for(vocab: int, budget_bytes: int = 2**29) -> int:
    """Tokens per chunk such that a chunk's float32 logits take at most ``budget_bytes`` (512 MiB: 1,046 tokens for a
    128k vocabulary, 4,194 for 32k): few enough chunks that the per-chunk gradient accumulation stays cheap."""
    return max(256, budget_bytes // (4 * vocab))


def head_losses(hidden: torch.Tensor, targets: torch.Tensor, student_head: Callable, loss: LogitLoss,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_head: Optional[Callable] = None,
                params: tuple[torch.Tensor, ...] = (), chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Mean LM cross-entropy (``lm``) and divergence (``distill``) per token, and their weighted sum (``loss``).

    ``hidden``/``teacher_hidden``: ``[..., d]`` final hidden states (before the heads); ``targets``: next-token ids,
    ``-100`` where no loss is taken. ``params``: the student head's trainable weights (their gradients are taken
    chunk by chunk too). ``chunk``: tokens per chunk; 0 computes all logits at once with plain autograd (the
    reference the chunked path is tested and benchmarked against).
    """
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.flatten(0, -2)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
        teacher_hidden = teacher_hidden[keep] if teacher_hidden is not None else None
    if chunk <= 0:
        with torch.no_grad():
            teacher = teacher_head(teacher_hidden) if teacher_hidden is not None else None
        terms = loss.terms(student_head(hidden), teacher, targets) / targets.numel()
        return {"loss": loss.weighted(terms), "lm": terms[0].detach(), "distill": terms[1].detach()}
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    total, terms = _ChunkedHeadLoss.apply(hidden, targets, teacher_hidden, student_head, teacher_head, loss, chunk,
                                          grad, *params)
    return {"loss": total, "lm": terms[0], "distill": terms[1]}
