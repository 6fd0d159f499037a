"""Reading checkpoint files as data only: nothing a checkpoint holds can run code when it loads."""

from __future__ import annotations

import pickle
from typing import Any

import torch


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
