"""benchmarks/README.md is what benchmarks/report.py writes from benchmarks/results/*.json (regenerate it after adding a
result), every result records its provenance, and the scripts' imports from chop still resolve."""

import importlib.util
import json

from helpers import ROOT


def test_the_benchmark_readme_is_generated_from_the_results():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (ROOT / "benchmarks" / "README.md").read_text() == report.render(), "run python benchmarks/report.py"


def test_every_result_records_its_provenance():
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        prov = json.loads(path.read_text()).get("provenance")
        assert prov and prov["gpu"] and prov["commit"] and prov["model"] and prov["data"] and "weights_sha256" in prov, \
            f"{path.name}: write results with chop.provenance"


def test_every_name_a_benchmark_imports_from_chop_exists():
    """The scripts run on a GPU, not in CI: at least every chop name they import (at the top or inside functions)
    must still exist after a refactor."""
    import ast
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + [ROOT / "recipes" / "why_lift_so_heavy" / "sweep.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "chop":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not (hasattr(module, "__path__")
                                                                    and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not missing
