"""Per-layer widths of a structurally pruned model: slicing a linear's rows or columns, recording the widths in the
config (``chop_widths`` where layers differ), and giving a freshly built model those shapes before its weights load."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from chop.models.registry import architecture, decoder_layers


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


def set_widths(config: Any, widths: list[dict[str, int]]) -> None:
    """Record per-layer widths; where every layer has the same, the config's own fields say it (plain
    ``from_pretrained`` then builds the right shapes) and ``chop_widths`` is not needed for that field."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    uniform = {k: widths[0][k] for k in widths[0] if all(w[k] == widths[0][k] for w in widths)}
    if text.model_type != "opt" and "num_key_value_heads" in uniform and "num_attention_heads" in uniform:
        text.head_dim = head_dim  # explicit, since it no longer equals hidden_size / heads
        text.num_attention_heads, text.num_key_value_heads = uniform["num_attention_heads"], uniform["num_key_value_heads"]
        heads_uniform = True
    else:
        heads_uniform = False
    mlp_field = "ffn_dim" if text.model_type == "opt" else "intermediate_size"
    if "intermediate_size" in uniform:
        setattr(text, mlp_field, uniform["intermediate_size"])
    if not heads_uniform or "intermediate_size" not in uniform:
        text.chop_widths = widths
    elif hasattr(text, "chop_widths"):
        del text.chop_widths


def apply_widths(model: PreTrainedModel) -> PreTrainedModel:
    """Give a freshly built model the per-layer shapes its config's ``chop_widths`` records (weights: load next)."""
    config = model.config.get_text_config()
    widths = getattr(config, "chop_widths", None)
    if not widths:
        return model
    arch = architecture(config)
    for i, (block, w) in enumerate(zip(decoder_layers(model), widths)):
        mods = dict(block.named_modules())
        prefix = f"{arch.layers}.{i}."
        for name in arch.mlp_in:
            slice_linear(model, prefix + name, 0, list(range(w["intermediate_size"])))
        slice_linear(model, prefix + arch.mlp_out, 1, list(range(w["intermediate_size"])))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_rows, kv_rows = list(range(w["num_attention_heads"] * head_dim)), list(range(w["num_key_value_heads"] * head_dim))
        slice_linear(model, prefix + arch.attention[0], 0, q_rows)
        slice_linear(model, prefix + arch.attention[1], 0, kv_rows)
        slice_linear(model, prefix + arch.attention[2], 0, kv_rows)
        slice_linear(model, prefix + arch.attention[3], 1, q_rows)
        set_attention_heads(mods[arch.attention[0].rsplit(".", 1)[0]], w["num_attention_heads"], w["num_key_value_heads"])
    return model
