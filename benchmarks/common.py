"""What the benchmark scripts share: where each writes its JSON."""

import os
from pathlib import Path


def result_path(name: str) -> Path:
    """``$OUT/name`` when ``OUT`` is set (the GPU machine's folder that comes back), else ``benchmarks/results/name``;
    its folder made."""
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
