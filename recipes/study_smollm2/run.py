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
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

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
        acc = EventAccumulator(str(ev), purge_orphaned_data=False)  # every value, in the order written
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


class RunFailed(Exception):
    pass


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def chop(folder: Path, gpu: int, *args: str) -> None:
    """``python -m chop ARGS`` on GPU ``gpu``, its output appended to ``folder``/log.txt."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)} if torch_gpus() else None
    with open(folder / "log.txt", "a") as log:
        log.write(f"$ chop {' '.join(args)}\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "chop", *args], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (folder / "log.txt").read_text().splitlines()[-5:]
        raise RunFailed(f"chop {args[0]} exited {done.returncode} ({folder / 'log.txt'}):\n  " + "\n  ".join(tail))


class Study:
    def __init__(self, path: Path, runs: Path) -> None:
        self.path, self.runs = path, runs
        self.spec = yaml.safe_load(path.read_text())
        self.base = yaml.safe_load((path.parent / self.spec["base"]).read_text())

    def best_arm(self, section: str) -> str:
        """The section's arm with the highest mean 6-task average after recovery (or pruning)."""
        scores: dict[str, list[float]] = {}
        for result in self.runs.glob(f"{section}/*/seed*/result.json"):
            r = json.loads(result.read_text())
            scores.setdefault(r["arm"], []).append(r["after"]["just_chop_average"])
        if not scores:
            raise SystemExit(f"study: section '{section}' has no finished run yet; run it first (--only {section})")
        return max(scores, key=lambda a: sum(scores[a]) / len(scores[a]))

    def best(self, section: str) -> Any:
        """The chop settings of the section's best arm."""
        return self.spec["sections"][section]["arms"][self.best_arm(section)]["fit"]["model.init_args.chop"]

    def verify(self) -> dict:
        """Loads the export of each section's best arm (first seed) with ``AutoModelForCausalLM.from_pretrained``
        (``trust_remote_code``: layers of different widths) and scores it with ``chop eval`` in a new process, as the
        run scored itself (a recovery run: float32 weights under bf16 autocast); writes ``verify.json`` beside the
        runs, with each task's difference from result.json."""
        import torch
        from transformers import AutoModelForCausalLM

        from chop.models.loading import load_model

        out = {}
        for section, spec in self.spec["sections"].items():
            if not list(self.runs.glob(f"{section}/*/seed*/result.json")):
                continue
            arm = self.best_arm(section)
            folder = self.folder(section, arm, self.spec["seeds"][0])
            fit = "fit" in spec["arms"][arm]
            export = sorted((folder / "checkpoints").glob("hf*"))[-1] if fit else folder / "model"
            net = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
            ids = torch.arange(64).unsqueeze(0) * 7 % net.config.vocab_size
            with torch.no_grad():  # the model chop eval builds is the one from_pretrained builds
                logits_diff = (net(ids).logits - load_model(str(export)).eval()(ids).logits).abs().max().item()
            scores = folder / "verify-eval.json"
            if scores.exists():
                scores.unlink()  # this file is verify's own, redone each time
            ev = self.spec["eval"]
            chop(folder, 0, "eval", "--model", str(export), "--tasks", f"{ev['tasks']},c4", "--output", str(scores),
                 *(["--dtype", "bf16-mixed"] if fit and self.base["trainer"].get("precision") == "bf16-mixed" else []),
                 *(["--data_dir", ev["data_dir"]] if ev.get("data_dir") else []),
                 *(["--limit", str(ev["limit"])] if ev.get("limit") else []))
            again = self.scores(json.loads(scores.read_text()))
            reported = json.loads((folder / "result.json").read_text())["after"]
            acc = {t: abs(again["tasks"][t][0] - a) for t, (a, _) in reported["tasks"].items()}
            out[section] = {"arm": arm, "seed": self.spec["seeds"][0], "export": str(export.relative_to(self.runs)),
                            "params": sum(p.numel() for p in net.parameters()),
                            "logits_max_abs_diff_chop_loader": logits_diff, "accuracy_abs_diff": acc,
                            "perplexity": [reported["perplexity"], again["perplexity"]],
                            "same": max(acc.values()) == 0 and again["perplexity"] == reported["perplexity"]}
            print(f"verify: {section} / {arm}: {'the same' if out[section]['same'] else 'DIFFERENT'} "
                  f"(largest accuracy difference {max(acc.values()):.4f})", flush=True)
        (self.runs / "verify.json").write_text(json.dumps(out, indent=2))
        return out

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and (m := re.fullmatch(r"\{best: (\w+)\}", value)):
            return self.best(m.group(1))
        return value

    def jobs(self, sections: list[str]) -> list[tuple[str, str, int]]:
        """(section, arm, seed) of every run asked for, in study.yaml's order."""
        return [(section, arm, seed) for section, spec in self.spec["sections"].items()
                if not sections or section in sections for arm, how in spec["arms"].items()
                for seed in (self.spec["seeds"] if "fit" in how else self.spec["seeds"][:1])]  # pruning alone: seed-free

    def needs(self, section: str) -> set[str]:
        """The sections whose best arm this section's arms use (``{best: SECTION}``): they must finish first."""
        text = json.dumps(self.spec["sections"][section]["arms"])
        return set(re.findall(r"\{best: (\w+)\}", text))

    def folder(self, section: str, arm: str, seed: int) -> Path:
        return self.runs / section / slug(arm) / f"seed{seed}"

    def run(self, sections: list[str], at_once: int = 1, stop_after: Optional[float] = None) -> None:
        """Runs the asked-for runs not finished yet, ``at_once`` at a time spread over the GPUs (a 135M model leaves
        most of an H200 idle), each after the sections it needs; none starts after ``stop_after`` seconds."""
        start, visible = time.time(), torch_gpus()
        gpus = max(1, visible)
        todo = []
        for job in self.jobs(sections):
            if (self.folder(*job) / "result.json").exists():
                print(f"done: {job[0]} / {job[1]} / seed {job[2]}")
            else:
                todo.append(job)
        busy = [0] * gpus
        lock, failed = threading.Lock(), []

        def one(job: tuple[str, str, int], gpu: int) -> None:
            section, arm, seed = job
            how, folder = self.spec["sections"][section]["arms"][arm], self.folder(*job)
            began = time.time()
            try:
                result = (self.fit(folder, how["fit"], seed, gpu) if "fit" in how else self.prune(folder, how["prune"], gpu))
            except Exception as err:  # noqa: BLE001 - one run's failure (its log says why) stops no other run
                failed.append(job)
                print(f"FAILED: {section} / {arm} / seed {seed}: {err}", flush=True)
                return
            finally:
                with lock:
                    busy[gpu] -= 1
            result.update(section=section, arm=arm, seed=seed, seconds=time.time() - began, started=began,
                          at_once=at_once, gpus=visible, provenance=self.provenance(seed))
            (folder / "result.json").write_text(json.dumps(result, indent=2))
            print(f"finished: {section} / {arm} / seed {seed} in {time.time() - began:.0f} s", flush=True)

        with ThreadPoolExecutor(at_once) as pool:
            running: dict[Any, tuple[str, str, int]] = {}
            while todo or running:
                waiting = {s for s, _, _ in todo} | {j[0] for j in running.values()}
                ready = [j for j in todo if not (self.needs(j[0]) & waiting) and not self.needs(j[0]) & {f[0] for f in failed}]
                late = stop_after is not None and time.time() - start > stop_after
                while ready and len(running) < at_once and not late:
                    job = ready.pop(0)
                    todo.remove(job)
                    with lock:
                        gpu = busy.index(min(busy))
                        busy[gpu] += 1
                    print(f"running: {job[0]} / {job[1]} / seed {job[2]}" + (f" (GPU {gpu})" if visible else ""),
                          flush=True)
                    running[pool.submit(one, job, gpu)] = job
                if not running:
                    break  # stopped, or what is left needs a section that failed
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
                    del running[f]
        left = [j for j in todo if j not in failed]
        if left:
            print(f"not started ({'--stop_after' if stop_after else 'a section they need failed'}): "
                  + ", ".join(f"{s} / {a} / seed {n}" for s, a, n in left))
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed; each one's log.txt says why")

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

    def fit(self, folder: Path, settings: dict, seed: int, gpu: int = 0) -> dict:
        resume = ["--ckpt_path", "last"] if (folder / "checkpoints" / "last.ckpt").exists() else []
        if not resume and folder.exists():  # cut off before its first checkpoint: start again, the old one kept aside
            n = 1
            while folder.with_name(f"{folder.name}.interrupted-{n}").exists():
                n += 1
            folder.rename(folder.with_name(f"{folder.name}.interrupted-{n}"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(self.config(settings, seed, folder), sort_keys=False))
        chop(folder, gpu, "fit", "--config", str(folder / "config.yaml"), *resume)
        evals = sorted((folder / "checkpoints").glob("eval-step=*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
        tb = scalars(folder)
        hf = sorted((folder / "checkpoints").glob("hf*"))[-1]
        return {"before": self.scores(json.loads(evals[0].read_text())),
                "after": self.scores(json.loads(evals[-1].read_text())),
                "recovery_flops": tb.get("train/flops", [0.0])[-1], "gpu_hours": tb.get("train/gpu_hours", [0.0])[-1],
                **params_of(hf)}

    def prune(self, folder: Path, settings: dict, gpu: int = 0) -> dict:
        text = self.spec.get("prune_text", {})
        settings = {**settings, **({k: text[k] for k in ("calibration_samples", "seq_len") if k in text}
                                   if settings["method"] != "magnitude" else {})}
        folder.mkdir(parents=True, exist_ok=True)
        model = folder / "model"
        if not (model / "config.json").exists():
            chop(folder, gpu, "prune", "--model", self.spec["model"], "--out", str(model), "--pruning", json.dumps(settings),
                 "--held_out_blocks", str(text.get("held_out_blocks", 0)),
                 *(["--held_out_len", str(text["held_out_len"])] if "held_out_len" in text else []),
                 *text.get("extra_args", []))
        out = folder / "eval.json"
        if not out.exists():
            ev = self.spec["eval"]
            chop(folder, gpu, "eval", "--model", str(model), "--tasks", f"{ev['tasks']},c4", "--output", str(out),
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
    p.add_argument("--at_once", type=int, default=1, help="runs at the same time, spread over the visible GPUs")
    p.add_argument("--stop_after", type=float, help="start no run after this many seconds (those running finish)")
    p.add_argument("--verify", action="store_true", help="then load each section's best export with from_pretrained "
                   "and score it again with chop eval (runs/verify.json)")
    a = p.parse_args()
    if a.at_once < 1:
        raise SystemExit(f"--at_once: {a.at_once} must be >= 1")
    study = Study(a.study, a.runs)
    study.run(a.only, a.at_once, a.stop_after)
    if a.verify:
        study.verify()


if __name__ == "__main__":
    main()
