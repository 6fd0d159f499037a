"""Decoder layers of different widths in a Hugging Face causal LM, with no dependency on chop (torch only).

chop imports these functions, and writes this file's source, plus a subclass of the model's own class, beside every
exported model whose layers differ in width (``modeling_chop.py``), so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds those shapes without chop installed.
"""

from __future__ import annotations

import torch
from torch import nn


def slice_linear(model: nn.Module, name: str, axis: int, index: list[int]) -> None:
    """Replace linear ``name`` by one that keeps only rows (axis 0) or columns (axis 1) ``index`` of its weights."""
    old: nn.Linear = model.get_submodule(name)
    idx = torch.tensor(index, dtype=torch.long, device=old.weight.device)
    weight = old.weight.detach().index_select(axis, idx)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[idx] if axis == 0 else old.bias.detach())
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def set_attention_heads(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Tell an attention module its (fewer) query and key/value heads, under whichever names it reads them."""
    for attr, value in (("num_heads", heads), ("num_key_value_heads", kv_heads), ("num_attention_heads", heads)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)


def shape_layers(model: nn.Module, widths: list[dict], layers: str, attention: tuple, mlp_in: tuple, mlp_out: str,
                 head_dim: int) -> nn.Module:
    """Give each decoder block (the ModuleList at ``layers``) the widths recorded for it: MLP units and query and
    key/value heads, by slicing its linears (``attention``: q, k, v, output; weights are loaded next)."""
    for i, w in enumerate(widths):
        prefix = f"{layers}.{i}."
        units, q_rows = list(range(w["intermediate_size"])), list(range(w["num_attention_heads"] * head_dim))
        kv_rows = list(range(w["num_key_value_heads"] * head_dim))
        for name in mlp_in:
            slice_linear(model, prefix + name, 0, units)
        slice_linear(model, prefix + mlp_out, 1, units)
        for name, axis, rows in zip(attention, (0, 0, 0, 1), (q_rows, kv_rows, kv_rows, q_rows)):
            slice_linear(model, prefix + name, axis, rows)
        set_attention_heads(model.get_submodule(prefix + attention[0].rsplit(".", 1)[0]), w["num_attention_heads"],
                            w["num_key_value_heads"])
    return model
