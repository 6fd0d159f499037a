"""How far `chop eval --mode fast` is from the float32 truth, against exact bf16 (lm-eval's bits), from three runs.

    python -m chop eval --model M --tasks suite --samples true --mode exact --dtype float32  --output f32.json
    python -m chop eval --model M --tasks suite --samples true --mode exact --dtype bfloat16 --output exact.json
    python -m chop eval --model M --tasks suite --samples true --mode fast  --dtype bfloat16 --output fast.json
    python benchmarks/eval_agreement.py --float32 f32.json --exact exact.json --fast fast.json --gpu "NVIDIA H200"

Per task: |Δ log-likelihood| from float32 (median, p99) of each bf16 run, their ratio, and the accuracy changes
(``chop.eval.agreement``); each run's time as chop recorded it (in-process: start-up and imports not included).
Prints a table and writes eval_agreement.json ($OUT, else benchmarks/results/) with its provenance (``--gpu`` and
``--commit``: where the three runs were made, when that is not here).
"""

import argparse
import json
from pathlib import Path

from chop.eval.agreement import compare
from chop.provenance import provenance
from common import result_path


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("float32", "exact", "fast"):
        p.add_argument(f"--{name}", required=True, help=f"the {name} run's `chop eval --samples true` JSON")
    p.add_argument("--model", help="the hub id or directory the runs scored, for the provenance (default: the runs' "
                                    "own path; a hub id is hashed as this machine's copy of it)")
    p.add_argument("--gpu", help="the GPU the runs were made on (default: this machine's)")
    p.add_argument("--commit", help="chop's commit the runs were made at (default: this checkout's)")
    a = p.parse_args()
    runs = {k: json.loads(Path(getattr(a, k)).read_text()) for k in ("float32", "exact", "fast")}
    if len({(r["model"], r["tasks"], r["limit"]) for r in runs.values()}) != 1:
        raise SystemExit("--float32/--exact/--fast: the three runs must score the same model, tasks and --limit")
    table = compare(runs["float32"], runs["fast"], runs["exact"])
    print(f"{'task':<16}{'fast |Δ| med':>13}{'p99':>9}{'exact bf16 med':>15}{'p99':>9}{'med ratio':>10}"
          f"{'acc Δ fast':>11}{'exact':>8}{'further/doc ± se':>20}{'within':>8}")
    for task, t in table.items():
        f, b = t["fast"], t["bf16"]
        t["median_ratio"], t["p99_ratio"] = f["median"] / b["median"], f["p99"] / b["p99"]
        print(f"{task:<16}{f['median']:>13.3g}{f['p99']:>9.3g}{b['median']:>15.3g}{b['p99']:>9.3g}"
              f"{t['median_ratio']:>10.2f}{f['acc_diff']:>+11.4f}{b['acc_diff']:>+8.4f}"
              f"{t['excess']['mean']:>11.3f} ± {t['excess']['stderr']:<6.3f}{str(t['within']):>8}")
    times = {k: {"seconds": r["seconds"], "phases": r["phases"], "average": r["average"]} for k, r in runs.items()}
    for k, t in times.items():
        print(f"{k:<8} {t['seconds']:6.1f} s ({', '.join(f'{n} {s:.1f}' for n, s in t['phases'].items())}), "
              f"average {t['average']:.4f}")
    prov = provenance(a.model or runs["exact"]["model"], {"tasks": runs["exact"]["tasks"], "limit": runs["exact"]["limit"],
                                               "documents": "each task's evaluation split (hub, else chop's offline copies)"})
    if a.gpu or a.commit:
        prov.update({k: v for k, v in (("gpu", a.gpu), ("commit", a.commit)) if v})
        prov["note"] += " The three runs were made elsewhere (gpu, commit); torch is the summarising machine's."
    out = result_path("eval_agreement.json")
    out.write_text(json.dumps({"provenance": prov, "tasks": table, "runs": times}, indent=2))


if __name__ == "__main__":
    main()
