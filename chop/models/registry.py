"""Where each supported architecture keeps its decoder layers.

Adding an architecture is one line in ``ARCHITECTURES``: its ``model_type`` and the dotted path, from the
``*ForCausalLM`` module, to the ``nn.ModuleList`` of decoder blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Architecture:
    layers: str  # dotted path to the ModuleList of decoder blocks


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers"),
    "mistral": Architecture("model.layers"),
    "qwen2": Architecture("model.layers"),
    "qwen3": Architecture("model.layers"),
    "gemma2": Architecture("model.layers"),
    "gemma3_text": Architecture("model.layers"),
    "phi3": Architecture("model.layers"),
    "olmo2": Architecture("model.layers"),
    "opt": Architecture("model.decoder.layers"),
    "gpt2": Architecture("transformer.h"),
    "gpt_neox": Architecture("gpt_neox.layers"),
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
