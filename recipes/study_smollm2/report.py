"""Writes recipes/study_smollm2/README.md's results from the runs' result.json files: one table per section (zero-shot
per task and averages, mean over seeds with the spread, held-out perplexity, parameters, recovery FLOPs) and PNG
plots (6-task average against parameters kept, held-out perplexity against recovery FLOPs, placement bars).

    python recipes/study_smollm2/report.py [--study study.yaml] [--runs DIR] [--out README.md]

The README's text above the marker line is kept; everything below it is regenerated.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
MARKER = "<!-- everything below is written by report.py -->"


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def load(runs: Path) -> dict[tuple[str, str], list[dict]]:
    from run import finished  # run.py, beside this file

    out: dict[tuple[str, str], list[dict]] = {}
    for r in finished(runs):
        out.setdefault((r["section"], r["arm"]), []).append(r)
    return out


def table(spec: dict, section: str, results: dict) -> list[str]:
    arms = [a for a in spec["sections"][section]["arms"] if (section, a) in results]
    if not arms:
        return ["Not run yet.", ""]
    tasks = sorted({t for a in arms for r in results[(section, a)] for t in r["after"]["tasks"]})
    chopped = any(r.get("removed_layers") for a in arms for r in results[(section, a)])  # a column: which layers
    lines = ["| arm | seeds | parameters (non-zero) | recovery FLOPs | 6-task avg before | 6-task avg after | "
             "suite avg after | held-out ppl before | after | " + ("layers removed (per seed where they differ) | "
                                                                  if chopped else "") + " | ".join(tasks) + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if chopped else "") + "---:|" * len(tasks)]
    for arm in arms:
        rs = results[(section, arm)]
        cells = [arm, str(len(rs)), f"{rs[0]['nonzero_params'] / 1e6:.1f}M", f"{rs[0]['recovery_flops']:.2g}",
                 mean_spread([r["before"]["just_chop_average"] for r in rs]),
                 mean_spread([r["after"]["just_chop_average"] for r in rs]),
                 mean_spread([r["after"]["average"] for r in rs]),
                 mean_spread([r["before"]["perplexity"] for r in rs]), mean_spread([r["after"]["perplexity"] for r in rs])]
        if chopped:
            sets = {",".join(map(str, r["removed_layers"])) for r in rs if r.get("removed_layers")}
            cells.append(" / ".join(sorted(sets)))
        for t in tasks:  # accuracy, mean over seeds, with the task's own stderr of the first seed
            accs = [r["after"]["tasks"][t][0] for r in rs if t in r["after"]["tasks"]]
            err = rs[0]["after"]["tasks"].get(t, [None, None])[1]
            cells.append(f"{statistics.mean(accs):.3f}" + (f" ({err:.3f})" if err else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def timing(spec: dict, results: dict) -> list[str]:
    """How long each section took: its runs' wall-clock time (load, prune, recover, both evaluations, export), the
    sum over runs, and the minutes in which at least one of them ran (runs ran ``at_once`` at a time, and a section
    may span several sessions: the gaps between them are not counted)."""
    lines = ["### Time", "", "| section | runs | runs at once (GPUs) | sum of the runs' minutes | per run, median (s) "
             "| minutes with one of its runs running |", "|---|---:|---:|---:|---:|---:|"]
    for section in spec["sections"]:
        rs = [r for (s, _), rr in results.items() if s == section for r in rr]
        if rs:
            seconds = [r["seconds"] for r in rs]
            spans = [(r["started"], r["started"] + r["seconds"]) for r in rs if "started" in r]
            span = busy_seconds(spans) / 60 if spans else None
            at_once = sorted({f"{r.get('at_once', 1)} ({r.get('gpus', 1)})" for r in rs})
            lines.append(f"| {section} | {len(rs)} | {', '.join(at_once)} | {sum(seconds) / 60:.1f} | "
                         f"{statistics.median(seconds):.0f} | {'–' if span is None else f'{span:.1f}'} |")
    return lines + [""]


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: time in which at least one of them was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def stale(now: Any, section: str, results: dict) -> list[str]:
    """A line naming the runs of ``section`` that ran with other settings than ``now`` (run.py's Study of study.yaml
    as it is) asks for: run.py reruns them."""
    old = sorted({(r["arm"], r["provenance"]["commit"][:10]) for (s, arm), rs in results.items() if s == section
                  and arm in now.spec["sections"][section]["arms"] for r in rs
                  if r.get("settings") != now.settings(section, arm, r["seed"])})
    if not old:
        return []
    commits = ", ".join(sorted({c for _, c in old}))
    arms = {a for (s, a) in results if s == section and a in now.spec["sections"][section]["arms"]}
    which = "All of these runs" if {a for a, _ in old} == arms else "The runs of " + ", ".join(sorted({a for a, _ in old}))
    return [f"{which} ran (commit {commits}) with other settings than study.yaml's now; the next `run.py` runs them "
            f"again.", ""]


def pending(now: Any, section: str, results: dict) -> list[str]:
    """A line naming the runs of ``section`` that study.yaml asks for and that have not finished: run.py runs them."""
    done = {(r["arm"], r["seed"]) for (s, _), rs in results.items() if s == section for r in rs}
    todo = [f"{arm} (seed {seed})" for s, arm, seed in now.jobs([section]) if (arm, seed) not in done]
    return [f"Not finished yet: {', '.join(todo)}; the next `run.py` runs them.", ""] if todo else []


def verified(runs: Path) -> list[str]:
    """The exports of each section's best arm, loaded with from_pretrained and scored again (run.py --verify)."""
    path = runs / "verify.json"
    if not path.exists():
        return []
    lines = ["### The best arms' exports, loaded and scored again", "",
             "`run.py --verify`: `AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`, then `chop eval` "
             "in a new process (a recovery run: float32 weights under bf16 autocast, as the run scored itself).", "",
             "| section | arm | parameters | largest accuracy difference | held-out ppl, reported → again | same to the last digit |",
             "|---|---|---:|---:|---:|---|"]
    for section, v in json.loads(path.read_text()).items():
        if v["same"] is None:
            lines.append(f"| {section} | {v['arm']} | | | | not checked: {v['why']} |")
            continue
        before, again = v["perplexity"]
        lines.append(f"| {section} | {v['arm']} | {v['params'] / 1e6:.1f}M | {max(v['accuracy_abs_diff'].values()):.4f} "
                     f"| {before:.7g} → {again:.7g} | {'yes' if v['same'] else 'no'} |")
    return lines + [""]


def plots(spec: dict, results: dict, out: Path) -> list[str]:
    """The PNGs, beside ``out`` (README.md: plain names; another page: names that start with its own)."""
    prefix = "" if out.name == "README.md" else f"{out.stem}-"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out.parent / f"{prefix}{name}.png", dpi=120)
        made.append(f"{prefix}{name}.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (section, arm), rs in results.items():
        ax.scatter([r["nonzero_params"] / 1e6 for r in rs], [r["after"]["just_chop_average"] for r in rs], s=14)
        ax.annotate(arm, (rs[0]["nonzero_params"] / 1e6, rs[0]["after"]["just_chop_average"]), fontsize=6)
    ax.set_xlabel("parameters kept, non-zero (M)")
    ax.set_ylabel("6-task average (after recovery, where there is one)")
    save(fig, "average_vs_params")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (section, arm), rs in results.items():
        if rs[0]["recovery_flops"]:
            ax.scatter([r["recovery_flops"] for r in rs], [r["after"]["perplexity"] for r in rs], s=14, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("recovery FLOPs")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=6)
    save(fig, "perplexity_vs_flops")
    placement = [(arm, rs) for (section, arm), rs in results.items() if section == "placement"]
    if placement:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [a for a, _ in placement]
        ax.bar(names, [statistics.mean(r["after"]["just_chop_average"] for r in rs) for _, rs in placement],
               label="after recovery")
        ax.bar(names, [statistics.mean(r["before"]["just_chop_average"] for r in rs) for _, rs in placement],
               label="before", alpha=0.6)
        ax.set_ylabel("6-task average")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=7)
        save(fig, "placement")
    plt.close("all")
    return made


def render(study: Path, runs: Path, out: Path, model: Optional[str] = None) -> None:
    from run import Study  # run.py, beside this file

    now = Study(study, runs, model)
    spec, results = now.spec, load(runs)
    lines = [MARKER, "", "## Results", ""]
    if not results:
        lines += ["No run has finished yet: `python recipes/study_smollm2/run.py` (with a GPU), then this script.", ""]
    for section, s in spec["sections"].items():
        lines += [f"### {s['title']}", ""] + table(spec, section, results) + pending(now, section, results) \
            + stale(now, section, results)
    if results:
        lines += [f"![{p}]({p})" for p in plots(spec, results, out)] + [""]
        prov = next(iter(results.values()))[0]["provenance"]
        data = prov["data"]
        commits = collections.Counter(r["provenance"]["commit"][:10] for rs in results.values() for r in rs)
        lines += timing(spec, results) + verified(runs)
        lines += [f"Provenance of every run is in its result.json; e.g. GPU {prov['gpu']}, model {prov['model']} "
                  f"(weights sha256 {(prov['weights_sha256'] or 'none')[:12]}…), recovery data {data['recovery']} "
                  f"(offline copy used: {prov['offline_copy']}, corpus {data['offline_corpus']}); commit "
                  + ", ".join(f"{c} ({n} runs)" for c, n in commits.most_common()) + ".", ""]
    head = out.read_text().split(MARKER)[0] if out.exists() else ""
    out.write_text(head.rstrip() + "\n\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=HERE / "study.yaml")
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--out", type=Path, default=HERE / "README.md")
    p.add_argument("--model", help="the model the runs are of, where not study.yaml's (run.py --model)")
    a = p.parse_args()
    render(a.study, a.runs, a.out, a.model)


if __name__ == "__main__":
    main()
