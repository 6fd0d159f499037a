"""The residual stream's dtype under bf16 autocast (``model.residual_dtype``).

Under ``precision: bf16-mixed`` the weights are float32 and autocast runs each matmul in bfloat16, but the input
embeddings' output is float32, so every layer's output is added to a float32 residual stream, the norms read and
write float32, and each linear casts its float32 input to bfloat16 again (q, k and v each their own copy, kept for
the backward pass). ``bfloat16`` casts the embeddings' output once: the residual stream, the norms' inputs and the
linears' inputs are then bfloat16, as in Megatron-LM (its default, without ``--fp32-residual-connection``) and under
FSDP2's mixed precision (torchtitan). Less memory traffic and activation memory; other rounding. Evaluation during
training (under autocast) sees the bf16 stream too; the export is a plain transformers model, without the cast.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

import torch

ResidualDtype = Literal["float32", "bfloat16"]


def check_residual_dtype(residual_dtype: str, precision: Optional[Any] = None,
                         field: str = "model.residual_dtype") -> None:
    """Refuse, before any weights load, a dtype that is not one, and (given the trainer's ``precision``) a bfloat16
    residual stream without bf16 autocast to cast it to."""
    if residual_dtype not in get_args(ResidualDtype):
        raise ValueError(f"{field}: '{residual_dtype}' is not one of {list(get_args(ResidualDtype))}")
    if residual_dtype == "bfloat16" and precision is not None and str(precision) != "bf16-mixed":
        raise ValueError(f"{field}: 'bfloat16' keeps the residual stream in bf16 autocast's dtype, and "
                         f"trainer.precision is '{precision}', which runs no bf16 autocast; set trainer.precision: "
                         f"bf16-mixed, or leave {field}: float32")


def residual_in_bf16(model: Any) -> None:
    """Cast the input embeddings' output to bfloat16 while bf16 autocast is on (training, and evaluation under it);
    outside autocast the model computes as before. A hook, not a change to the weights: exports are unchanged."""

    def cast(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        kind = output.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
            return output.to(torch.bfloat16)
        return output

    model.get_input_embeddings().register_forward_hook(cast)
