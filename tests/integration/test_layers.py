"""chop's layers import one way: models <- data <- pruning, eval <- training <- cli. Nothing below training loads
Lightning, so `chop eval` and `chop prune` start without it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIX, ROOT

# Each layer, and the packages it must not load: those above it, and Lightning.
LAYERS = {
    "chop.models.loading, chop.models.registry, chop.models.widths, chop.models.checkpoint, chop.models.perplexity":
        ("chop.data", "chop.pruning", "chop.eval", "chop.training", "lightning"),
    "chop.data.text": ("chop.pruning", "chop.eval", "chop.training", "lightning"),
    "chop.pruning.registry, chop.pruning.student, chop.pruning.layerchop, chop.pruning.prune_cli":
        ("chop.eval", "chop.training", "lightning"),
    "chop.eval.engine, chop.eval.suite, chop.eval.eval_cli": ("chop.pruning", "chop.training", "lightning"),
}


# What each package may import from chop (its own layer and those below) and whether it may import Lightning.
MAY_IMPORT = {"models": {"models", "assets"}, "data": {"models", "data", "assets"},
              "pruning": {"models", "data", "pruning", "assets"}, "eval": {"models", "data", "eval", "assets"}}


def imports_of(path: Path) -> set:
    """Every module a file imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def loaded_after(code: str) -> set:
    """The top-level chop subpackages and third-party packages a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split())


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_no_file_of_a_layer_imports_a_layer_above_it_or_lightning(package):
    wrong = {}
    for path in sorted((ROOT / "chop" / package).glob("*.py")):
        bad = sorted(m for m in imports_of(path) if m.split(".")[0] == "lightning"
                     or (m.startswith("chop.") and m.split(".")[1] not in MAY_IMPORT[package]))
        if bad:
            wrong[path.name] = bad
    assert not wrong, f"chop/{package}: {wrong}"


@pytest.mark.parametrize("modules", list(LAYERS))
def test_a_layer_imports_nothing_above_it(modules):
    loaded = loaded_after(f"import {modules}")
    above = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in LAYERS[modules])]
    assert not above, f"{modules} loads {sorted(above)}"


def test_chop_eval_and_chop_prune_run_without_lightning(tmp_path):
    from helpers import tiny_llama

    model = tiny_llama(tmp_path / "tiny")
    code = (f"from chop.cli import main\n"
            f"main(['eval', '--model', '{model}', '--tasks', 'c4,copa', '--data_dir', '{FIX / 'eval'}', '--limit', '3'])\n"
            f"main(['prune', '--model', '{model}', '--out', '{tmp_path / 'pruned'}', '--pruning.mode', 'structured', "
            f"'--pruning.sparsity', '0.2', '--pruning.calibration_samples', '2', '--pruning.seq_len', '16', "
            f"'--calibration.files', '[{FIX / 'train.jsonl'}]', '--held_out_blocks', '0'])")
    loaded = loaded_after(code)
    assert (tmp_path / "pruned" / "pruning.json").exists()
    assert "lightning" not in loaded and "chop.training" not in loaded
