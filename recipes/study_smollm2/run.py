"""Runs the study's arms (study.yaml) through chop's own CLI, skipping finished runs, so it resumes across sessions.

    python recipes/study_smollm2/run.py [--study recipes/study_smollm2/study.yaml] [--runs DIR] [--only SECTION ...]

A recovery arm is ``chop fit`` on base.yaml with the arm's settings (its config is written beside its run); the
zero-shot callback scores the suite and held-out perplexity (``c4``: offline, english-passages val) before the first
step and after the last. An arm without recovery is ``chop prune`` then ``chop eval`` on the same tasks. Each finished
run leaves ``result.json``: scores before and after, parameters, recovery FLOPs, seconds, and its provenance (model
and the sha256 of its weights, data and split, seed, commit). A run cut off mid-way resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


def params_of(folder: Path) -> dict:
    """Parameters of an exported model: all of them, and those not zero (unstructured and n:m pruning keep zeros)."""
    from safetensors.torch import load_file

    total = nonzero = 0
    for path in folder.glob("*.safetensors"):
        for t in load_file(str(path)).values():
            total, nonzero = total + t.numel(), nonzero + int((t != 0).sum())
    return {"params": total, "nonzero_params": nonzero}


def scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for ev in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def chop(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "chop", *args], cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"chop {args[0]} failed ({done.returncode}); its output is above")


class Study:
    def __init__(self, path: Path, runs: Path) -> None:
        self.path, self.runs = path, runs
        self.spec = yaml.safe_load(path.read_text())
        self.base = yaml.safe_load((path.parent / self.spec["base"]).read_text())

    def best(self, section: str) -> Any:
        """The chop settings of the section's arm with the highest mean 6-task average after recovery."""
        scores: dict[str, list[float]] = {}
        for result in self.runs.glob(f"{section}/*/seed*/result.json"):
            r = json.loads(result.read_text())
            scores.setdefault(r["arm"], []).append(r["after"]["just_chop_average"])
        if not scores:
            raise SystemExit(f"study: section '{section}' has no finished run yet; run it first (--only {section})")
        arm = max(scores, key=lambda a: sum(scores[a]) / len(scores[a]))
        return self.spec["sections"][section]["arms"][arm]["fit"]["model.init_args.chop"]

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and (m := re.fullmatch(r"\{best: (\w+)\}", value)):
            return self.best(m.group(1))
        return value

    def run(self, sections: list[str]) -> None:
        for section, spec in self.spec["sections"].items():
            if sections and section not in sections:
                continue
            for arm, how in spec["arms"].items():
                for seed in self.spec["seeds"] if "fit" in how else self.spec["seeds"][:1]:  # pruning alone: seed-free
                    folder = self.runs / section / slug(arm) / f"seed{seed}"
                    if (folder / "result.json").exists():
                        print(f"done: {section} / {arm} / seed {seed}")
                        continue
                    print(f"running: {section} / {arm} / seed {seed}", flush=True)
                    start = time.time()
                    result = self.fit(folder, how["fit"], seed) if "fit" in how else self.prune(folder, how["prune"])
                    result.update(section=section, arm=arm, seed=seed, seconds=time.time() - start,
                                  provenance=self.provenance(seed))
                    (folder / "result.json").write_text(json.dumps(result, indent=2))

    def config(self, settings: dict, seed: int, folder: Path) -> dict:
        """base.yaml with the arm's settings, writing its run into ``folder``."""
        cfg = json.loads(json.dumps(self.base))
        cfg["seed_everything"] = seed
        for key, value in settings.items():
            value = self.resolve(value)
            if key == "budget":
                next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ComputeBudget"))[
                    "init_args"]["max_flops"] = value
            else:
                set_dotted(cfg, key, value)
        cfg["trainer"]["logger"]["init_args"].update(save_dir=str(folder.parent), name="", version=folder.name)
        return cfg

    def fit(self, folder: Path, settings: dict, seed: int) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(self.config(settings, seed, folder), sort_keys=False))
        resume = ["--ckpt_path", "last"] if (folder / "checkpoints" / "last.ckpt").exists() else []
        chop("fit", "--config", str(folder / "config.yaml"), *resume)
        evals = sorted((folder / "checkpoints").glob("eval-step=*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
        tb = scalars(folder)
        hf = sorted((folder / "checkpoints").glob("hf*"))[-1]
        return {"before": self.scores(json.loads(evals[0].read_text())),
                "after": self.scores(json.loads(evals[-1].read_text())),
                "recovery_flops": tb.get("train/flops", [0.0])[-1], "gpu_hours": tb.get("train/gpu_hours", [0.0])[-1],
                **params_of(hf)}

    def prune(self, folder: Path, settings: dict) -> dict:
        text = self.spec.get("prune_text", {})
        settings = {**settings, **({k: text[k] for k in ("calibration_samples", "seq_len") if k in text}
                                   if settings["method"] != "magnitude" else {})}
        folder.mkdir(parents=True, exist_ok=True)
        model = folder / "model"
        if not (model / "config.json").exists():
            chop("prune", "--model", self.spec["model"], "--out", str(model), "--pruning", json.dumps(settings),
                 "--held_out_blocks", str(text.get("held_out_blocks", 0)),
                 *(["--held_out_len", str(text["held_out_len"])] if "held_out_len" in text else []),
                 *text.get("extra_args", []))
        out = folder / "eval.json"
        if not out.exists():
            ev = self.spec["eval"]
            chop("eval", "--model", str(model), "--tasks", f"{ev['tasks']},c4", "--output", str(out),
                 *(["--data_dir", ev["data_dir"]] if ev.get("data_dir") else []), *(["--limit", str(ev["limit"])]
                                                                                    if ev.get("limit") else []))
        scores = self.scores(json.loads(out.read_text()))
        return {"before": scores, "after": scores, "recovery_flops": 0.0, **params_of(model)}

    @staticmethod
    def scores(evaluation: dict) -> dict:
        """Per task accuracy (acc_norm where reported) and its stderr; the suite's and Just CHOP's 6-task averages;
        held-out perplexity (the c4 task)."""
        from chop.eval.tasks import JUST_CHOP

        res = evaluation["results"]
        acc = {t: (r.get("acc_norm", r.get("acc")), r.get("acc_norm_stderr", r.get("acc_stderr")))
               for t, r in res.items() if "acc" in r}
        six = [acc[t][0] for t in JUST_CHOP if t in acc]
        return {"tasks": acc, "average": sum(a for a, _ in acc.values()) / max(1, len(acc)),
                "just_chop_average": sum(six) / len(six) if six else None,
                "perplexity": res.get("c4", {}).get("perplexity")}

    def provenance(self, seed: int) -> dict:
        """chop's provenance record (GPU, commit, model and its weights' sha256, data) of this run, and its seed."""
        from chop import assets
        from chop.provenance import provenance

        data = self.base["data"]["init_args"]
        recovery = {"recovery": data.get("train_files") or f"{data.get('path')} ({data.get('config_name')}, train)",
                    "offline_corpus": data.get("offline"), "held_out": "task c4 (offline: english-passages val)"}
        record = provenance(self.spec["model"], recovery)
        source = assets.home() / "corpus" / str(data.get("offline")) / "SOURCE.json"
        if record["offline_copy"] and source.exists():  # which texts (and package versions) the offline corpus holds
            record["data"]["offline_source"] = json.loads(source.read_text())
        return {**record, "seed": seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=HERE / "study.yaml")
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--only", nargs="*", default=[], help="sections to run (default: all, in order)")
    a = p.parse_args()
    Study(a.study, a.runs).run(a.only)


if __name__ == "__main__":
    main()
