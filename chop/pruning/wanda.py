"""Wanda (arXiv 2306.11695): remove the weights of least |W_ij|·‖x_j‖ in each output row (or in each n:m group), with
‖x_j‖ the L2 norm of input channel j over the calibration tokens; no weight update. As in the paper, decoder blocks
are pruned in order, each block's inputs coming from the blocks already pruned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


from chop.models.registry import architecture, decoder_layers
from chop.pruning import shots, statistics
from chop.pruning.elements import nm_costs, row_mask
from chop.pruning.pruner import Pruner, Report


@dataclass
class Wanda(Pruner):
    """Wanda's settings (the paper's: 128 sequences of 2,048 tokens of C4).

    Args:
        mode: unstructured (``sparsity`` of each row) or semistructured (n:m).
        sparsity: unstructured: the fraction of each decoder linear's weights removed, row by row.
        n, m: semistructured: n zeros in every m consecutive weights of a row (2:4).
        calibration_samples: calibration sequences (of the model's context length, or ``seq_len``).
        seq_len: calibration sequence length (default: the model's context length).
        batch_size: calibration sequences per forward pass.
    """

    method: Literal["wanda"] = "wanda"
    mode: Literal["unstructured", "semistructured"] = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    calibration_samples: int = 128
    seq_len: Optional[int] = None
    batch_size: int = 4

    def prune(self, model, batches, evaluate=None, on_shot=None) -> Report:
        return shots.run(model, self, lambda state, target, t: self.shot(state, target, batches), evaluate, on_shot)

    def shot(self, state: shots.State, target: float, batches) -> None:
        prefix = architecture(state.model.config).layers
        for i in range(len(decoder_layers(state.model))):
            block = {k: v for k, v in state.layers.items() if k.startswith(f"{prefix}.{i}.")}
            norms = statistics.gather(state.model, block, batches, statistics.squares, until_block=i)
            for name, layer in block.items():
                scores = layer.weight.detach().abs().double() * norms[name].sqrt().to(layer.weight.device)
                if self.mode == "semistructured":
                    state.masks[name] = nm_costs(scores, self.n, self.m)[1]
                else:
                    state.masks[name] = row_mask(scores, target)
            shots.zero_removed(state)  # the next block sees this one pruned
