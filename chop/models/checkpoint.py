"""chop's checkpoints as files: read as data only (nothing a checkpoint holds can run code when it loads), the model
a training checkpoint records, and Hugging Face directories written from a model."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, PreTrainedModel

from chop.models.loading import from_config, load_tokenizer
from chop.models.widths import write_remote_code


def load_checkpoint(path: Any, field: str = "--ckpt_path") -> dict:
    """A checkpoint's contents, read as data only (``weights_only=True``): a file that needs pickled code to load is
    refused, since loading it would run that code; so is a truncated or corrupt one."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise ValueError(f"{field}: '{path}' needs pickled Python objects to load, and loading them could run any code "
                         f"in it; chop's own checkpoints hold only tensors and plain data. Refused. If you trust its "
                         f"author, re-save its state_dict as plain data. ({str(err).splitlines()[0]})") from err
    except Exception as err:
        raise ValueError(f"{field}: '{path}' is not a readable checkpoint ({type(err).__name__}: {err}); "
                         f"it may be truncated or corrupt: pick another one, e.g. an earlier step's") from err


CKPT_KEY = "chop"  # what chop adds to a Lightning checkpoint: the trained model's HF config, source and plan


def load_chop_checkpoint(path: str, field: str = "--ckpt_path") -> dict:
    """A whole chop Lightning checkpoint, or a clear error when the file is not a readable chop checkpoint."""
    ckpt = load_checkpoint(path, field)
    if CKPT_KEY not in ckpt:
        raise ValueError(f"{field}: '{path}' is not a chop checkpoint (no '{CKPT_KEY}' entry)")
    return ckpt


def read_checkpoint_meta(path: str, field: str = "--ckpt_path") -> dict:
    """chop's part of a Lightning checkpoint (and its hyperparameters)."""
    ckpt = load_chop_checkpoint(path, field)
    meta = dict(ckpt[CKPT_KEY])
    meta["hyper_parameters"] = ckpt.get("hyper_parameters", {})
    return meta


def model_from_checkpoint(ckpt: str, field: str = "--ckpt") -> tuple[Any, Optional[str]]:
    """The trained model of a chop Lightning checkpoint, and its tokenizer's name."""
    full = load_chop_checkpoint(ckpt, field)
    meta = full[CKPT_KEY]
    model = from_config(AutoConfig.for_model(**meta["config"]))
    state = full["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{field}: the weights in '{ckpt}' do not fit the model config it records: {err}") from err
    return model, meta["tokenizer"]


# Config entries that say nothing about the architecture (where and how it was saved).
_VOLATILE = {"transformers_version", "_name_or_path", "use_cache", "dtype", "torch_dtype", "architectures",
             "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "chop_plan"}


def config_differences(saved: dict, now: dict) -> list[str]:
    """The architecture fields in which two configs (``to_dict()``) differ, each as 'field: saved vs now'."""
    keys = sorted((set(saved) | set(now)) - _VOLATILE)
    return [f"{k}: {saved.get(k)!r} vs {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def export_hf(model: PreTrainedModel, tokenizer: Optional[str], out: Path, state_dict: Optional[dict] = None) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face directory, never over an existing non-empty one.

    ``state_dict``: the full weights when ``model``'s own are sharded (FSDP).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export: '{out}' exists and is not empty; choose another --out or remove it")
    save_model(model, out, state_dict)
    if tokenizer:
        load_tokenizer(tokenizer).save_pretrained(out)
    return out


def save_model(model: PreTrainedModel, out: Path, state_dict: Optional[dict] = None) -> None:
    """``save_pretrained`` for generation (``use_cache`` on), and, where layers differ in width, the modeling code that
    lets ``from_pretrained(out, trust_remote_code=True)`` load it without chop (``widths.write_remote_code``)."""
    config = model.config
    was_cache = config.use_cache
    config.use_cache = True
    try:
        model.save_pretrained(out, state_dict=state_dict)
    finally:
        config.use_cache = was_cache
    write_remote_code(model, Path(out))
