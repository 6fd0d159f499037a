"""Runs the study's arms (study.yaml) through chop's own CLI, skipping finished runs, so it resumes across sessions.

    python recipes/study_smollm2/run.py [--study recipes/study_smollm2/study.yaml] [--runs DIR] [--only SECTION ...]
                                        [--at_once N] [--finish_within SECONDS] [--verify] [--model HUB_ID --runs DIR]

An arm is one of three kinds. ``fit``: ``chop fit`` on base.yaml with the arm's settings (its config is written beside
its run); the zero-shot callback scores the suite and held-out perplexity (``c4``: offline, english-passages val)
before the first step and after the last. ``prune``: ``chop prune`` then ``chop eval`` on the same tasks. ``eval``: the
model itself through ``chop eval`` (the dense reference). Each finished run leaves ``result.json``: scores before and
after, parameters, recovery FLOPs, seconds, the settings it ran with, and its provenance (model and the sha256 of its
weights, data and split, seed, commit). A run is finished when its result.json records the settings the study asks
for now; one whose settings changed is set aside (``seedN.superseded-K``) and run again. A run cut off mid-way resumes
from its last checkpoint, or starts again (the old folder set aside as ``seedN.interrupted-K``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KINDS = ("fit", "prune", "eval")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


def finished(runs: Path, section: str = "*", aside: bool = False) -> list[dict]:
    """The result.json of every finished run (folders ``seedN``; with ``aside``, also those set aside)."""
    return [json.loads(p.read_text()) for p in sorted(runs.glob(f"{section}/*/seed*/result.json"))
            if aside or re.fullmatch(r"seed\d+", p.parent.name)]


def set_aside(folder: Path, why: str) -> None:
    """Keep an unfinished or superseded run beside the new one as ``<folder>.<why>-K``, never over another."""
    n = 1
    while folder.with_name(f"{folder.name}.{why}-{n}").exists():
        n += 1
    folder.rename(folder.with_name(f"{folder.name}.{why}-{n}"))


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
    def __init__(self, message: str, out_of_memory: bool) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


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
        raise RunFailed(f"chop {args[0]} exited {done.returncode} ({folder / 'log.txt'}):\n  " + "\n  ".join(tail),
                        out_of_memory=any("OutOfMemoryError" in line or "out of memory" in line for line in tail))


class Study:
    def __init__(self, path: Path, runs: Path, model: Optional[str] = None) -> None:
        self.path, self.runs = path, runs
        self.frozen: dict[str, str] = {}  # section -> its best arm, fixed while that arm's first seed runs again
        self.spec = yaml.safe_load(path.read_text())
        self.base = yaml.safe_load((path.parent / self.spec["base"]).read_text())
        if model:  # the same grid on another model (e.g. google/gemma-3-270m)
            self.spec["model"] = model
            set_dotted(self.base, "model.init_args.name", model)
        for section, spec in self.spec["sections"].items():
            for arm, how in spec["arms"].items():
                if [k for k in KINDS if k in how] != [next(iter(how))] or len(how) != 1:
                    raise SystemExit(f"study.yaml: sections.{section}.arms.{arm}: give exactly one of {KINDS}")

    # --- which runs, in which order -------------------------------------------------------------------------------

    def jobs(self, sections: list[str]) -> list[tuple[str, str, int]]:
        """(section, arm, seed) of every run asked for, in study.yaml's order; an arm that trains runs once per seed."""
        return [(section, arm, seed) for section, spec in self.spec["sections"].items()
                if not sections or section in sections for arm, how in spec["arms"].items()
                for seed in (self.spec["seeds"] if "fit" in how else self.spec["seeds"][:1])]

    def needs(self, section: str) -> set[str]:
        """The sections whose best arm this section's arms use (``{best: SECTION}``): they must finish first."""
        return set(re.findall(r"\{best: (\w+)\}", json.dumps(self.spec["sections"][section]["arms"])))

    def folder(self, section: str, arm: str, seed: int) -> Path:
        return self.runs / section / slug(arm) / f"seed{seed}"

    def best_arm(self, section: str) -> str:
        """The section's arm (of those study.yaml still lists) with the highest mean 6-task average after recovery."""
        if section in self.frozen:
            return self.frozen[section]
        scores: dict[str, list[float]] = {}
        for r in finished(self.runs, section):
            if r["arm"] in self.spec["sections"][section]["arms"]:
                scores.setdefault(r["arm"], []).append(r["after"]["just_chop_average"])
        if not scores:
            raise SystemExit(f"study: section '{section}' has no finished run yet; run it first (--only {section})")
        return max(scores, key=lambda a: sum(scores[a]) / len(scores[a]))

    def best(self, section: str) -> Any:
        """The chop settings of the section's best arm."""
        return self.spec["sections"][section]["arms"][self.best_arm(section)]["fit"]["model.init_args.chop"]

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and (m := re.fullmatch(r"\{best: (\w+)\}", value)):
            return self.best(m.group(1))
        return value

    def settings(self, section: str, arm: str, seed: int) -> dict:
        """Everything a run's numbers depend on, as recorded in its result.json: a changed arm runs again."""
        how = self.spec["sections"][section]["arms"][arm]
        if "fit" in how:
            cfg = self.config(how["fit"], seed, self.folder(section, arm, seed))
            cfg["trainer"].pop("logger")  # where the run writes, not what it does
            return {"fit": cfg}
        common = {"model": self.spec["model"], "eval": self.spec["eval"]}
        return {"prune": self.prune_settings(how["prune"]), "text": self.spec.get("prune_text", {}), **common} \
            if "prune" in how else common

    def is_done(self, job: tuple[str, str, int]) -> bool:
        """Finished with the settings asked for now; a result of other settings is set aside, to run again."""
        folder = self.folder(*job)
        if not (folder / "result.json").exists():
            return False
        if json.loads((folder / "result.json").read_text()).get("settings") == self.settings(*job):
            return True
        print(f"changed since it ran: {job[0]} / {job[1]} / seed {job[2]}; the old run is set aside", flush=True)
        set_aside(folder, "superseded")
        return False

    def expected(self) -> Callable[[tuple[str, str, int]], float]:
        """How long a run is expected to take, in seconds: the longest finished run of its arm (result.json files,
        set-aside ones too), else of its section, else of the study, else 0."""
        longest: dict[Any, float] = {}
        for r in finished(self.runs, aside=True):
            for key in ((r["section"], r["arm"]), r["section"], None):
                longest[key] = max(longest.get(key, 0.0), r["seconds"])
        return lambda job: longest.get(job[:2], longest.get(job[0], longest.get(None, 0.0)))

    def run(self, sections: list[str], at_once: int = 1, finish_within: Optional[float] = None,
            jobs: Optional[list[tuple[str, str, int]]] = None) -> None:
        """Runs the asked-for runs (``jobs``, or those of ``sections``) not finished yet, ``at_once`` at a time spread
        over the GPUs (a 135M model leaves most of an H200 idle), each after the sections it needs. With
        ``finish_within``, a run starts only if it can end within that many seconds of the start, judged by the
        longest finished run of its arm (``expected``): a GPU lent for a fixed time then cuts no run off. A run
        that runs out of GPU memory beside other runs is tried again later with its GPU to itself; out of memory
        alone, it has failed."""
        start, visible = time.time(), torch_gpus()
        gpus = max(1, visible)
        todo, busy, lock = list(jobs) if jobs is not None else self.jobs(sections), [0] * gpus, threading.Lock()
        failed: list[tuple[str, str, int]] = []
        alone: set[tuple[str, str, int]] = set()  # out of memory beside other runs: the next try has a GPU to itself
        held = [False] * gpus  # a GPU given to one of those

        def one(job: tuple[str, str, int], gpu: int) -> None:
            section, arm, seed = job
            how, folder = self.spec["sections"][section]["arms"][arm], self.folder(*job)
            began = time.time()
            try:
                result = (self.fit(folder, how["fit"], seed, gpu) if "fit" in how else
                          self.prune(folder, how["prune"], gpu) if "prune" in how else self.reference(folder, gpu))
            except Exception as err:  # noqa: BLE001 - one run's failure (its log says why) stops no other run
                with lock:
                    beside = busy[gpu] - 1
                if isinstance(err, RunFailed) and err.out_of_memory and beside and job not in alone:
                    alone.add(job)
                    todo.append(job)
                    print(f"out of GPU memory beside {beside} other run(s), to run again with a GPU to itself: "
                          f"{section} / {arm} / seed {seed}", flush=True)
                else:
                    failed.append(job)
                    print(f"FAILED: {section} / {arm} / seed {seed}: {err}", flush=True)
                return
            finally:
                with lock:
                    busy[gpu] -= 1
                    held[gpu] = False
            result.update(section=section, arm=arm, seed=seed, seconds=time.time() - began, started=began,
                          at_once=at_once, gpus=visible, settings=self.settings(*job),
                          provenance=self.provenance(seed))
            (folder / "result.json").write_text(json.dumps(result, indent=2))
            print(f"finished: {section} / {arm} / seed {seed} in {time.time() - began:.0f} s", flush=True)

        def place(job: tuple[str, str, int]) -> Optional[int]:
            """The least busy GPU the run may start on now, if any (called under ``lock``)."""
            free = [g for g in range(gpus) if not held[g] and not (job in alone and busy[g])]
            return min(free, key=busy.__getitem__, default=None)

        with ThreadPoolExecutor(at_once) as pool:
            running: dict[Any, tuple[str, str, int]] = {}
            while todo or running:
                waiting = {s for s, _, _ in todo} | {j[0] for j in running.values()}
                blocked = (waiting - set(self.frozen)) | {s for s, _, _ in failed}
                ready = [j for j in todo if not self.needs(j[0]) & blocked]
                expected = self.expected() if finish_within is not None else None
                left = None if finish_within is None else finish_within - (time.time() - start)
                done = [j for j in ready if self.is_done(j)]
                for job in done:
                    ready.remove(job)
                    todo.remove(job)
                    print(f"done: {job[0]} / {job[1]} / seed {job[2]}")
                fits = [j for j in ready if left is None or expected(j) <= left]
                while len(running) < at_once:
                    with lock:
                        pick = next(((j, g) for j in fits if (g := place(j)) is not None), None)
                        if pick is None:
                            break
                        job, gpu = pick
                        fits.remove(job)
                        todo.remove(job)
                        busy[gpu] += 1
                        held[gpu] = job in alone
                    self.fresh(self.folder(*job))
                    print(f"running: {job[0]} / {job[1]} / seed {job[2]}" + (f" (GPU {gpu})" if visible else ""),
                          flush=True)
                    running[pool.submit(one, job, gpu)] = job
                if not running:
                    if done:
                        continue  # a section just found finished may be what others wait for: look again
                    break  # what is left does not fit the time left, or needs a section that failed
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished_now:
                    f.result()
                    del running[f]
        if todo:
            why = "too little of --finish_within left" if finish_within else "a section they need failed"
            print(f"not started ({why}): " + ", ".join(f"{s} / {a} / seed {n}" for s, a, n in todo))
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed; each one's log.txt says why")

    # --- one run ----------------------------------------------------------------------------------------------------

    @staticmethod
    def fresh(folder: Path) -> None:
        """A run cut off before its first checkpoint (or a failed one) starts again, the old folder kept aside."""
        if folder.exists() and not (folder / "checkpoints" / "last.ckpt").exists():
            set_aside(folder, "interrupted")
        folder.mkdir(parents=True, exist_ok=True)

    def config(self, settings: dict, seed: int, folder: Path) -> dict:
        """base.yaml with the arm's settings, writing its run into ``folder``; the seed also orders the training
        text (the data module's own seed), so that seeds differ in what they train on, not only in GPU rounding."""
        cfg = json.loads(json.dumps(self.base))
        cfg["seed_everything"] = seed
        cfg["data"].setdefault("init_args", {})["seed"] = seed
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
        (folder / "config.yaml").write_text(yaml.safe_dump(self.config(settings, seed, folder), sort_keys=False))
        chop(folder, gpu, "fit", "--config", str(folder / "config.yaml"), *resume)
        evals = sorted((folder / "checkpoints").glob("eval-step=*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
        tb = scalars(folder)
        hf = self.export(folder, "fit")
        plan = folder / "checkpoints" / "chop_plan.json"  # which layers a chop removed (block_influence: by the text)
        return {"removed_layers": json.loads(plan.read_text())["removed"] if plan.exists() else None,
                "before": self.scores(json.loads(evals[0].read_text())),
                "after": self.scores(json.loads(evals[-1].read_text())),
                "recovery_flops": tb.get("train/flops", [0.0])[-1], "gpu_hours": tb.get("train/gpu_hours", [0.0])[-1],
                **params_of(hf)}

    def prune_settings(self, settings: dict) -> dict:
        text = self.spec.get("prune_text", {})
        return {**settings, **({k: text[k] for k in ("calibration_samples", "seq_len") if k in text}
                               if settings["method"] != "magnitude" else {})}

    def prune(self, folder: Path, settings: dict, gpu: int = 0) -> dict:
        text, model = self.spec.get("prune_text", {}), folder / "model"
        chop(folder, gpu, "prune", "--model", self.spec["model"], "--out", str(model),
             "--pruning", json.dumps(self.prune_settings(settings)),
             "--held_out_blocks", str(text.get("held_out_blocks", 0)),
             *(["--held_out_len", str(text["held_out_len"])] if "held_out_len" in text else []),
             *text.get("extra_args", []))
        scores = self.evaluate(folder, model, gpu, folder / "eval.json")
        return {"before": scores, "after": scores, "recovery_flops": 0.0, **params_of(model)}

    def reference(self, folder: Path, gpu: int = 0) -> dict:
        """The model itself, scored as the pruned ones are: the reference row."""
        from chop.models.loading import resolve

        path = Path(resolve(self.spec["model"]))
        if not path.is_dir():  # a hub id: the files from_pretrained reads, from its cache
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(self.spec["model"], allow_patterns=["*.json", "*.safetensors"]))
        scores = self.evaluate(folder, self.spec["model"], gpu, folder / "eval.json")
        return {"before": scores, "after": scores, "recovery_flops": 0.0, **params_of(path)}

    def evaluate(self, folder: Path, model: Any, gpu: int, out: Path, dtype: Optional[str] = None,
                 batch_size: Any = None) -> dict:
        """``chop eval`` of ``model`` on study.yaml's tasks and held-out perplexity, written to ``out``."""
        ev = self.spec["eval"]
        batch_size = batch_size or ev.get("batch_size")
        chop(folder, gpu, "eval", "--model", str(model), "--tasks", f"{ev['tasks']},c4", "--output", str(out),
             *(["--dtype", dtype] if dtype else []), *(["--batch_size", str(batch_size)] if batch_size else []),
             *(["--data_dir", ev["data_dir"]] if ev.get("data_dir") else []),
             *(["--limit", str(ev["limit"])] if ev.get("limit") else []))
        return self.scores(json.loads(out.read_text()))

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
                "perplexity": res.get("c4", {}).get("perplexity"),  # and a batch size halved when out of memory:
                "batch_size_lowered_to": evaluation.get("batch_size_lowered_to")}

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

    # --- the acceptance check of the best exports -------------------------------------------------------------------

    def best_runs(self, sections: list[str]) -> list[tuple[tuple[str, str, int], str, Optional[Path]]]:
        """Of each finished section (of ``sections``; none: all), its best arm's first seed, the arm's kind and the
        run's export here (None: not here); the dense reference exports nothing and is left out."""
        out = []
        for section, spec in self.spec["sections"].items():
            if sections and section not in sections or not all(map(self.is_done, self.jobs([section]))):
                continue
            arm = self.best_arm(section)
            kind = next(iter(spec["arms"][arm]))
            if kind != "eval":
                job = (section, arm, self.spec["seeds"][0])
                out.append((job, kind, self.export(self.folder(*job), kind)))
        return out

    def rerun_for_verify(self, sections: list[str]) -> list[tuple[str, str, int]]:
        """Of the sections whose runs have all finished, the best arm's first seed where its export is not here (git
        keeps only result.json): set aside, so that the next ``run`` runs it again beside the unfinished runs. The
        section's best arm stays fixed meanwhile, so the sections that use it need not wait."""
        jobs = [job for job, _, export in self.best_runs(sections) if export is None]
        for section, arm, seed in jobs:
            self.frozen[section] = arm
            set_aside(self.folder(section, arm, seed), "no-export")
        if jobs:
            print("verify: no export here of " + ", ".join(f"{s} / {a} / seed {n}" for s, a, n in jobs)
                  + "; running again", flush=True)
        return jobs

    @staticmethod
    def export(folder: Path, kind: str) -> Optional[Path]:
        """Where a run saved its model (a recovery run: its last ``hf*`` export), or None where it is not here."""
        found = sorted((folder / "checkpoints").glob("hf*"))[-1:] if kind == "fit" else [folder / "model"]
        return found[0] if found and (found[0] / "config.json").exists() else None

    def verify(self, sections: list[str], at_once: int = 1) -> dict:
        """Loads the export of each section's best arm (first seed) with ``AutoModelForCausalLM.from_pretrained``
        (``trust_remote_code``: layers of different widths) and scores it with ``chop eval`` in a new process, as the
        run scored itself (a recovery run: float32 weights under bf16 autocast, the callback's batch size); writes
        ``verify.json`` beside the runs, with each task's difference from result.json. A best run whose export is not
        here (git keeps only result.json; the run was on another machine) runs again first, its old result set aside.
        ``sections`` (none: all) are verified; the other sections' entries already in verify.json are kept."""
        import torch
        from transformers import AutoModelForCausalLM

        from chop.models.loading import load_model

        self.frozen.clear()  # earlier reruns have finished: the best arms as the results now say
        missing = self.rerun_for_verify(sections)
        if missing:
            self.run([], at_once, jobs=missing)
            self.frozen.clear()
        written = self.runs / "verify.json"
        out = {s: v for s, v in (json.loads(written.read_text()) if written.exists() else {}).items()
               if sections and s not in sections}
        for (section, arm, seed), kind, export in self.best_runs(sections):  # unfinished sections: best arm not known yet
            folder = self.folder(section, arm, seed)
            if export is None:  # its rerun changed which arm is best, and that one's export is elsewhere
                out[section] = {"arm": arm, "seed": seed, "same": None, "why": "no export here; run --verify again"}
                print(f"verify: {section} / {arm}: no export here; run --verify again", flush=True)
                continue
            net = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
            ids = torch.arange(64).unsqueeze(0) * 7 % net.config.vocab_size
            with torch.no_grad():  # the model chop eval builds is the one from_pretrained builds
                logits_diff = (net(ids).logits - load_model(str(export)).eval()(ids).logits).abs().max().item()
            scores = folder / "verify-eval.json"
            scores.unlink(missing_ok=True)  # this file is verify's own, redone each time
            result = json.loads((folder / "result.json").read_text())
            if kind == "fit":  # as the run scored itself: its precision, its callback's batch size
                trainer = result["settings"]["fit"]["trainer"]
                callback = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ZeroShotEvalCallback"))
                again = self.evaluate(folder, export, 0, scores,
                                      "bf16-mixed" if trainer.get("precision") == "bf16-mixed" else None,
                                      callback["init_args"].get("batch_size", "auto"))
            else:
                again = self.evaluate(folder, export, 0, scores)
            out[section] = {"arm": arm, "seed": seed, "export": str(export.relative_to(self.runs)),
                            "params": sum(p.numel() for p in net.parameters()),
                            "logits_max_abs_diff_chop_loader": logits_diff, **compared(result["after"], again)}
            print(f"verify: {section} / {arm}: {'the same' if out[section]['same'] else 'DIFFERENT'} "
                  f"(largest accuracy difference {max(out[section]['accuracy_abs_diff'].values()):.4f})", flush=True)
            written.write_text(json.dumps(out, indent=2))  # each section as it is done: a later one cut off loses none
        written.write_text(json.dumps(out, indent=2))
        return out


def compared(reported: dict, again: dict) -> dict:
    """How a run's own end-of-training scores (``reported``) and its export's ``chop eval`` (``again``) differ."""
    acc = {t: abs(again["tasks"][t][0] - a) for t, (a, _) in reported["tasks"].items()}
    return {"accuracy_abs_diff": acc, "perplexity": [reported["perplexity"], again["perplexity"]],
            "batch_size_lowered_to": [reported.get("batch_size_lowered_to"), again["batch_size_lowered_to"]],
            "same": max(acc.values()) == 0 and again["perplexity"] == reported["perplexity"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=HERE / "study.yaml")
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--model", help="run the grid on this model instead of study.yaml's (give it its own --runs)")
    p.add_argument("--only", nargs="*", default=[], help="sections to run (default: all, in order)")
    p.add_argument("--at_once", type=int, default=1, help="runs at the same time, spread over the visible GPUs")
    p.add_argument("--finish_within", type=float, help="start only runs that can end within this many seconds, judged "
                   "by their arm's (else section's) longest finished run; for a GPU lent for a fixed time")
    p.add_argument("--verify", action="store_true", help="then load each section's best export (of --only's sections) "
                   "with from_pretrained and score it again with chop eval (runs/verify.json)")
    a = p.parse_args()
    if a.at_once < 1:
        raise SystemExit(f"--at_once: {a.at_once} must be >= 1")
    if a.model and a.runs == HERE / "runs":
        raise SystemExit(f"--runs: give {a.model} a folder of its own (e.g. --runs {HERE / 'runs'}-{slug(a.model)}), "
                         f"not the one study.yaml's model's runs are in")
    study = Study(a.study, a.runs, a.model)
    if a.verify:  # finished sections' best runs without an export here run again beside the rest
        study.rerun_for_verify(a.only)
    study.run(a.only, a.at_once, a.finish_within)
    if a.verify:
        study.verify(a.only, a.at_once)


if __name__ == "__main__":
    main()
