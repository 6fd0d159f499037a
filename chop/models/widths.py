"""Per-layer widths of a structurally pruned model: recording them in the config (``chop_widths`` where layers
differ), giving a freshly built model those shapes before its weights load, and writing the modeling code that lets
Hugging Face tools load such a model without chop (the slicing itself: ``per_layer_widths.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from chop.models.per_layer_widths import shape_layers
from chop.models.registry import architecture


def set_widths(config: Any, widths: list[dict[str, int]]) -> None:
    """Record per-layer widths; where every layer has the same, the config's own fields say it (plain
    ``from_pretrained`` then builds the right shapes) and ``chop_widths`` is not needed for that field."""
    text = config.get_text_config()
    head_dim = _head_dim(text)
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
    return shape_layers(model, widths, arch.layers, arch.attention, arch.mlp_in, arch.mlp_out, _head_dim(config))


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


REMOTE_CODE = "modeling_chop.py"


def write_remote_code(model: PreTrainedModel, folder: Path) -> None:
    """Beside a saved model whose layers differ in width: ``modeling_chop.py`` (``per_layer_widths.py`` and a subclass
    of the model's class that shapes its layers) and ``auto_map`` in its config, so that
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without chop."""
    config = model.config.get_text_config()
    if not getattr(config, "chop_widths", None):
        return
    from chop.models import per_layer_widths

    arch, base = architecture(config), type(model)
    name = f"Chop{base.__name__}"
    source = Path(per_layer_widths.__file__).read_text() + f"""

from {base.__module__} import {base.__name__} as _Base


class {name}(_Base):
    \"\"\"{base.__name__} whose decoder layers have the widths ``config.chop_widths`` records (written by chop).\"\"\"

    def __init__(self, config):
        super().__init__(config)
        shape_layers(self, config.chop_widths, {arch.layers!r}, {arch.attention!r}, {arch.mlp_in!r}, {arch.mlp_out!r},
                     {_head_dim(config)})
"""
    (folder / REMOTE_CODE).write_text(source)
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    saved["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE.removesuffix('.py')}.{name}"}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
