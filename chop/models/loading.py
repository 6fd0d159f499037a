"""Load a causal LM by hub id, local path or config, falling back to chop's offline copies without the Hub."""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chop import assets
from chop.models.widths import apply_widths

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name: str) -> str:
    """A local path for ``name`` when it is one, or when the Hub is unreachable and chop has an offline copy.

    Otherwise ``name`` itself, for ``from_pretrained`` to fetch from the Hub.
    """
    if Path(name).exists() or name not in assets.OFFLINE_MODELS:
        return name

    def on_hub() -> str:
        from huggingface_hub import model_info

        model_info(name, timeout=10)
        return name

    return assets.hub_or_offline(f"model '{name}'", on_hub, lambda: str(assets.OFFLINE_MODELS[name]()), "")


def load_config(name: str) -> Any:
    return AutoConfig.from_pretrained(resolve(name))


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve(name))


def load_model(
    name: Optional[str] = None,
    config: Optional[dict] = None,
    dtype: str = "float32",
    attn_implementation: Optional[str] = None,
    seed: int = 0,
    init_device: Optional[str] = None,
) -> PreTrainedModel:
    """A causal LM from ``name`` (hub id or directory) or, for tests, random-init from a ``config`` dict.

    ``config`` needs ``model_type``; with ``name`` too, it overrides fields of that model's config. ``init_device``:
    draw a random-init model's weights there (seconds on a GPU where the CPU takes minutes at 7B; the values are that
    device's random numbers, not the CPU's); otherwise it is built on the CPU (``built_on_cpu``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: '{dtype}' is not one of {list(DTYPES)}")
    if init_device is not None:
        if name is not None:
            raise ValueError("init_device: only for a random-init model (a config without a name); loaded weights "
                             "are read, not drawn: leave it unset and move the model with .to()")
        return initialised_on(torch.device(init_device), lambda: _load(None, config, dtype, attn_implementation, seed),
                              seed)
    return built_on_cpu(lambda: _load(name, config, dtype, attn_implementation, seed))


def _load(name: Optional[str], config: Optional[dict], dtype: str, attn_implementation: Optional[str],
          seed: int) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name is None:
        if not config or "model_type" not in config:
            raise ValueError("model: give a hub id / directory (model.name) or a config dict with model_type (model.config)")
        fields = {k: v for k, v in config.items() if k != "model_type"}
        cfg = AutoConfig.for_model(config["model_type"], **fields)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(cfg, **kwargs)
    path = resolve(name)
    cfg = AutoConfig.from_pretrained(path, **(config or {}))
    if getattr(cfg.get_text_config(), "chop_widths", None):
        return _load_per_layer_widths(path, cfg, kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **(config or {}), **kwargs)


def from_config(config: Any, **kwargs: Any) -> PreTrainedModel:
    """A random-init model of ``config``, with the per-layer widths a structured prune recorded (``chop_widths``)."""
    return built_on_cpu(lambda: apply_widths(AutoModelForCausalLM.from_config(config, **kwargs)))


def built_on_cpu(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """``build()`` on the CPU, then moved to the default device where that is an accelerator (Lightning builds the
    model under its GPU's): a GPU computes the buffers a model derives rather than loads (RoPE's ``inv_freq``) an ulp
    away from the CPU, where ``from_pretrained`` computes them for chop eval, lm-eval and users, and under bf16 that
    ulp moved a trained model's scores by a few documents from its export's. The meta device builds as it is."""
    device = torch.get_default_device()
    if device.type in ("cpu", "meta"):
        return build()
    with torch.device("cpu"):
        model = build()
    return model.to(device)


def initialised_on(device: torch.device, build: Callable[[], PreTrainedModel], seed: int) -> PreTrainedModel:
    """``build()`` (a random init) on the meta device, its tensors made on ``device`` and drawn there by transformers'
    own ``init_weights``, seeded; the buffers a model derives (RoPE's ``inv_freq``) computed on the CPU, as in
    ``built_on_cpu``."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    for m in model.modules():  # transformers skips what it marked initialised; nothing on the meta device is
        m.__dict__.pop("_is_hf_initialized", None)
        for t in chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            t.__dict__.pop("_is_hf_initialized", None)
    with torch.device("cpu"), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model


def _load_per_layer_widths(path: str, config: Any, kwargs: dict) -> PreTrainedModel:
    """A model whose layers differ in width (structured pruning): transformers' configs cannot say so, so build the
    architecture, give each layer its recorded shapes, then load the weights."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    model = from_config(config, **kwargs)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    if unexpected or set(missing) - tied:
        raise ValueError(f"model: the weights in '{path}' do not fit the widths its config records "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
