"""benchmarks/README.md is what benchmarks/report.py writes from benchmarks/results/*.json (regenerate it after adding a
result), and every result measured since provenance records exist carries one."""

import importlib.util
import json

from helpers import ROOT


def test_the_benchmark_readme_is_generated_from_the_results():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (ROOT / "benchmarks" / "README.md").read_text() == report.render(), "run python benchmarks/report.py"


def test_new_results_record_their_provenance():
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        result = json.loads(path.read_text())
        if "provenance" in result:
            prov = result["provenance"]
            assert prov["gpu"] and prov["commit"] and prov["data"] and "weights_sha256" in prov, path.name
    assert "provenance" in json.loads((ROOT / "benchmarks" / "results" / "surgeon_quality_h200.json").read_text())
