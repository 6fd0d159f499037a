"""Where each supported architecture keeps its decoder layers.

Adding an architecture is one line in ``ARCHITECTURES``: its ``model_type`` and the dotted path, from the
``*ForCausalLM`` module, to the ``nn.ModuleList`` of decoder blocks; for structured pruning also the names of its
attention and MLP linears within a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Architecture:
    layers: str  # dotted path to the ModuleList of decoder blocks
    # Within a block, for structured pruning (None: separate linears not available, e.g. fused qkv):
    attention: Optional[tuple[str, str, str, str]] = None  # q, k, v (rows by head) and output (columns by head)
    mlp_in: Optional[tuple[str, ...]] = None  # linears whose rows are the MLP's hidden units
    mlp_out: Optional[str] = None  # the linear whose columns are those units


_LLAMA = dict(attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
              mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", **_LLAMA),
    "mistral": Architecture("model.layers", **_LLAMA),
    "qwen2": Architecture("model.layers", **_LLAMA),
    "qwen3": Architecture("model.layers", **_LLAMA),
    "gemma2": Architecture("model.layers", **_LLAMA),
    "gemma3_text": Architecture("model.layers", **_LLAMA),
    "phi3": Architecture("model.layers"),
    "olmo2": Architecture("model.layers", **_LLAMA),
    "opt": Architecture("model.decoder.layers", attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.out_proj"), mlp_in=("fc1",), mlp_out="fc2"),
    "gpt2": Architecture("transformer.h"),
    "gpt_neox": Architecture("gpt_neox.layers"),
    # Layer chopping and distillation only (no structured-pruning names): MoE MLPs, fused or biased projections.
    "mixtral": Architecture("model.layers"),
    "qwen2_moe": Architecture("model.layers"),
    "qwen3_moe": Architecture("model.layers"),
    "falcon": Architecture("transformer.h"),
    "stablelm": Architecture("model.layers"),
    "phi": Architecture("model.layers"),
    "gptj": Architecture("transformer.h"),
    "bloom": Architecture("transformer.h"),
    "starcoder2": Architecture("model.layers"),
    "cohere": Architecture("model.layers"),
}


def architecture(config: PretrainedConfig) -> Architecture:
    """The registry entry for ``config.model_type``, or an error that says how to add one."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise NotImplementedError(
            f"chop has no registry entry for model_type '{config.model_type}': add one to "
            f"chop.models.registry.ARCHITECTURES naming where its decoder layers live "
            f"(the dotted path to their nn.ModuleList). Known: {sorted(ARCHITECTURES)}"
        )
    return arch


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of ``model``."""
    path = architecture(model.config).layers
    module = model.get_submodule(path)
    if not isinstance(module, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.{path} is {type(module).__name__}, expected nn.ModuleList")
    return module


def num_layers(config: PretrainedConfig) -> int:
    return config.get_text_config().num_hidden_layers


def head_adjustments(model: nn.Module) -> tuple[Optional[float], float]:
    """(soft-cap, scale) that the model's forward applies to its LM head's output: Gemma's soft-capping (None: none)
    and Cohere's scale (1: none)."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere: a float its forward multiplies the logits by
    return cap or None, scale if isinstance(scale, (int, float)) else 1


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states -> logits as the model's own forward computes them (LM head, then Cohere's scale or Gemma's
    soft-capping)."""
    head = model.get_output_embeddings()
    cap, scale = head_adjustments(model)
    if cap:
        return lambda h: torch.tanh(head(h) / cap) * cap
    if scale != 1:
        return lambda h: head(h) * scale
    return head
