"""Token perplexity, defined once: exp of the summed negative log-likelihood over the number of predicted tokens.
``chop prune``'s held-out text, ``chop eval``'s ``c4`` blocks and training's ``val/ppl`` all report it."""

from __future__ import annotations

import math


def token_perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens): ``nll`` summed over ``tokens`` predicted tokens (a block of L + 1 tokens predicts L)."""
    return math.exp(nll / tokens)
