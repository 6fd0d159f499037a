"""n:m sparse weights run by PyTorch's semi-structured (2:4) kernels, for inference."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from chop.pruning.structures import linears


def to_semi_structured(model: PreTrainedModel, n: int = 2, m: int = 4) -> int:
    """Swap the weights of every decoder linear that is n:m sparse for PyTorch's semi-structured sparse tensor, so its
    2:4 kernels run them (CUDA, float16/bfloat16). Returns how many linears were swapped."""
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for layer in linears(model).values():
        w = layer.weight.detach()
        if w.shape[1] % m == 0 and bool(((w.view(w.shape[0], -1, m) == 0).sum(-1) >= n).all()):
            layer.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            swapped += 1
    return swapped
