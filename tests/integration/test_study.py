"""The study's pipeline end to end on a tiny model (recipes/study_smollm2): a recovery arm (`chop fit`, scored before
and after) and an arm without recovery (`chop prune`, `chop eval`), each run's result.json with its provenance, a
second run that skips what is finished and checks the best exports, and the report's tables and plots; then the
runner's scheduling alone, with fake runs."""

import importlib.util
import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from helpers import EVAL_FIX, FIX, ROOT, TINY_CPU, tiny_llama


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_the_study_runs_two_arms_resumes_and_reports(tmp_path, monkeypatch, device):
    model = tiny_llama(tmp_path / "model", layers=4)
    base = yaml.safe_load(open(TINY_CPU))
    if device == "gpu":  # as the study runs: bf16 autocast, and still each export scores what its run reported
        base["trainer"].update(accelerator="gpu", precision="bf16-mixed")
    base["model"]["init_args"].pop("config")
    base["model"]["init_args"].update(name=str(model), tokenizer=str(model))
    base["model"]["init_args"].pop("chop")
    base["data"]["init_args"].update(train_files=[str(FIX / "train.jsonl")], val_files=[str(FIX / "val.jsonl")],
                                     num_workers=0)
    base["trainer"]["callbacks"] += [
        {"class_path": "chop.training.callbacks.ComputeBudget", "init_args": {"max_flops": 3.0e7}},
        {"class_path": "chop.ZeroShotEvalCallback", "init_args": {"tasks": "piqa,copa,c4", "data_dir": str(EVAL_FIX),
                                                                  "on_checkpoint": False, "at_start": True,
                                                                  "at_end": True, "limit": 4}}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"base": "base.yaml", "model": str(model), "seeds": [0],
             "eval": {"tasks": "piqa,copa", "data_dir": str(EVAL_FIX), "limit": 4},
             "prune_text": {"held_out_blocks": 0,
                            "extra_args": ["--calibration.files", f"[{FIX / 'train.jsonl'}]"]},
             "sections": {"reference": {"title": "Dense", "arms": {"dense": {"eval": {}}}},
                          "placement": {"title": "Which layers", "arms": {
                              "input": {"fit": {"model.init_args.chop": {"strategy": "input", "n_keep": 2}}}}},
                          "curvature": {"title": "No recovery", "arms": {
                              "magnitude 20%": {"prune": {"method": "magnitude", "sparsity": 0.2, "align": 4}},
                              "broken": {"prune": {"method": "magnitude", "sparsity": 1.5}}}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    run = [sys.executable, str(ROOT / "recipes" / "study_smollm2" / "run.py"), "--study", str(tmp_path / "study.yaml"),
           "--runs", str(tmp_path / "runs"), "--at_once", "3"]
    first = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)  # three at once; one fails, alone
    assert first.returncode == 1 and "1 run(s) failed" in first.stderr, first.stderr[-3000:]
    assert "FAILED: curvature / broken" in first.stdout and "sparsity" in first.stdout
    assert not (tmp_path / "runs" / "curvature" / "broken" / "seed0" / "result.json").exists()
    fit = json.loads((tmp_path / "runs" / "placement" / "input" / "seed0" / "result.json").read_text())
    assert fit["recovery_flops"] >= 3.0e7 and fit["before"]["tasks"].keys() == {"piqa", "copa"}
    assert fit["before"]["perplexity"] != fit["after"]["perplexity"] and fit["after"]["perplexity"] > 1  # it trained
    assert fit["provenance"]["seed"] == 0 and len(fit["provenance"]["weights_sha256"]) == 64
    pruned = json.loads((tmp_path / "runs" / "curvature" / "magnitude-20" / "seed0" / "result.json").read_text())
    assert pruned["recovery_flops"] == 0 and pruned["params"] < fit["params"] + 10**9
    dense = json.loads((tmp_path / "runs" / "reference" / "dense" / "seed0" / "result.json").read_text())
    assert dense["params"] > pruned["nonzero_params"] and dense["after"]["tasks"].keys() == {"piqa", "copa"}
    assert fit["settings"]["fit"]["data"]["init_args"]["seed"] == 0  # the seed orders the training text too
    del study["sections"]["curvature"]["arms"]["broken"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    # (a best run whose export is not here runs again for --verify: the scheduling test below)
    again = subprocess.run(run + ["--verify"], capture_output=True, text=True, cwd=ROOT)  # nothing reruns
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done:") == 3 and "running:" not in again.stdout, again.stdout
    # each section's best export loads with from_pretrained and scores with `chop eval` as the run reported
    verify = json.loads((tmp_path / "runs" / "verify.json").read_text())
    assert verify.keys() == {"placement", "curvature"} and all(v["same"] for v in verify.values()), verify
    assert verify["placement"]["params"] == fit["params"]
    readme = tmp_path / "README.md"
    readme.write_text("# The study\n\nWhat we found: ...\n")
    report = subprocess.run([sys.executable, str(ROOT / "recipes" / "study_smollm2" / "report.py"), "--study",
                             str(tmp_path / "study.yaml"), "--runs", str(tmp_path / "runs"), "--out", str(readme)],
                            capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    text = readme.read_text()
    assert text.startswith("# The study\n\nWhat we found") and "| input | 1 |" in text and "| magnitude 20% | 1 |" in text
    assert "### The best arms' exports" in text and "| placement | input |" in text
    assert (tmp_path / "average_vs_params.png").exists() and (tmp_path / "placement.png").exists()
    # a run whose settings differ from what the study now asks for is set aside, to run again
    spec = importlib.util.spec_from_file_location("study_run", ROOT / "recipes" / "study_smollm2" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    study_now = runner.Study(tmp_path / "study.yaml", tmp_path / "runs")
    done = tmp_path / "runs" / "curvature" / "magnitude-20" / "seed0"
    assert study_now.is_done(("curvature", "magnitude 20%", 0))
    old = json.loads((done / "result.json").read_text())
    (done / "result.json").write_text(json.dumps({**old, "settings": {**old["settings"], "prune": {"sparsity": 0.3}}}))
    assert not study_now.is_done(("curvature", "magnitude 20%", 0)) and not done.exists()
    assert (done.parent / "seed0.superseded-1" / "result.json").exists()
    monkeypatch.syspath_prepend(str(ROOT / "recipes" / "study_smollm2"))  # report.py imports run.py beside it
    report = importlib.import_module("report")  # the report names the run the next run.py does
    assert "magnitude 20% (seed 0)" in report.pending(study_now, "curvature", report.load(tmp_path / "runs"))[0]
    # the Time table counts the minutes in which some run went, not the gap between two sessions
    assert report.busy_seconds([(30.0, 40.0), (0.0, 10.0), (5.0, 20.0)]) == 30.0


def test_the_runner_starts_a_section_once_the_one_it_needs_is_done_also_when_that_one_was_done_before(tmp_path, capsys):
    """Scheduling alone (no chop run): a section that needs another's best arm runs after it, whether that one runs
    now or finished in an earlier session; a run out of GPU memory beside another is tried again with the GPU to
    itself, and out of memory alone it has failed; best runs rerun for --verify (no export here) run side by side,
    the needed section's best arm held fixed; with --finish_within, a run longer than the time left does not start."""
    spec = importlib.util.spec_from_file_location("study_run", ROOT / "recipes" / "study_smollm2" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "trainer": {"callbacks": [], "logger": {"init_args": {}}}, "data": {"init_args": {}}}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "model": "m", "seeds": [0], "eval": {"tasks": "piqa"},
        "sections": {"placement": {"title": "A", "arms": {"x": {"fit": {"model.init_args.chop": {"n": 1}}},
                                                          "w": {"fit": {"model.init_args.chop": {"n": 2}}}}},
                     "recovery": {"title": "B", "arms": {"y": {"fit": {"model.init_args.chop": "{best: placement}"}}}}}}))
    side_by_side = threading.Barrier(2, timeout=30)
    ran, ooms, together, live = [], [], [side_by_side], []

    def fake_fit(study, folder, settings, seed):
        chop = study.config(settings, seed, folder)["model"]["init_args"]["chop"]
        live.append(folder)
        try:
            if together:
                together[0].wait()  # returns once both runs are running at the same time, else times out
            if chop == {"n": 1} and not ooms:  # the first try of placement's x, beside w
                ooms.append(len(live))
                together.clear()
                raise runner.RunFailed("CUDA out of memory", out_of_memory=True)
            if chop == {"n": 2}:
                time.sleep(0.5)  # w still runs when x has failed: x's next try must wait for it
            ran.append((folder.parent.parent.name, chop, len(live)))
        finally:
            live.remove(folder)
        score = {"tasks": {}, "average": 1 / chop["n"], "just_chop_average": 1 / chop["n"], "perplexity": 10.0}
        return {"before": score, "after": score, "recovery_flops": 1.0, "params": 1, "nonzero_params": 1}

    def study():
        s = runner.Study(tmp_path / "study.yaml", tmp_path / "runs")
        s.fit = lambda folder, settings, seed, gpu=0: fake_fit(s, folder, settings, seed)
        s.provenance = lambda seed: {"seed": seed, "commit": "c"}
        return s

    # an earlier session, placement alone: x runs out of memory beside w, then runs again with nothing beside it
    study().run(["placement"], at_once=2)
    assert ooms == [2] and [r[2] for r in ran if r[1] == {"n": 1}] == [1] and len(ran) == 2 and not side_by_side.broken
    study().run([], at_once=2)  # placement finished before: recovery starts, with placement's best arm
    assert [r[0] for r in ran] == ["placement", "placement", "recovery"] and ran[2][1] == {"n": 1}
    again = study()  # a later session with --verify: neither export is here (fake runs write none)
    assert again.rerun_for_verify([]) == [("placement", "x", 0), ("recovery", "y", 0)]
    assert (tmp_path / "runs" / "placement" / "x" / "seed0.no-export-1" / "result.json").exists()
    together.append(threading.Barrier(2, timeout=30))
    again.run([], at_once=2)
    assert sorted(r[0] for r in ran[3:]) == ["placement", "recovery"] and not together[0].broken
    # --verify --only recovery: only recovery's best run again, and placement's entry in verify.json kept as it was
    (tmp_path / "runs" / "verify.json").write_text(json.dumps({"placement": {"arm": "x", "same": True}}))
    together.clear()  # one run now, nothing to wait for
    checked = again.verify(["recovery"])
    assert [r[0] for r in ran[5:]] == ["recovery"] and checked["placement"] == {"arm": "x", "same": True}
    assert checked["recovery"]["same"] is None  # fake runs write no export to score
    assert json.loads((tmp_path / "runs" / "verify.json").read_text()) == checked

    tries = []
    lone = study()
    lone.fit = lambda *a, **k: tries.append(1) or (_ for _ in ()).throw(runner.RunFailed("OOM", out_of_memory=True))
    (tmp_path / "runs" / "placement" / "w" / "seed0" / "result.json").unlink()
    x = tmp_path / "runs" / "placement" / "x" / "seed0" / "result.json"
    x.write_text(json.dumps({**json.loads(x.read_text()), "seconds": 100.0}))
    lone.run([], jobs=[("placement", "w", 0)], finish_within=99)  # no run of w has finished: its section's took 100 s
    assert tries == [] and "(too little of --finish_within left): placement / w / seed 0" in capsys.readouterr().out
    aside = tmp_path / "runs" / "placement" / "w" / "seed0.superseded-1"  # an earlier run of w itself took 10 s
    aside.mkdir()
    (aside / "result.json").write_text(json.dumps({"section": "placement", "arm": "w", "seed": 0, "seconds": 10.0}))
    with pytest.raises(SystemExit, match="1 run"):  # out of memory with the GPU to itself: failed, not tried again
        lone.run([], at_once=2, jobs=[("placement", "w", 0)], finish_within=50)
    assert tries == [1]
