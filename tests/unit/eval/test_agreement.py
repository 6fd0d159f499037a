"""The fast mode's agreement machinery (chop/eval/agreement.py): |Δ log-likelihood| from the float32 truth per task,
against exact bf16's, on hand-made results and on a tiny model scored three ways by `chop eval`."""

import pytest

from chop.eval.agreement import compare, distance, documents


def result(lls, acc):
    return {"results": {"piqa": {"acc": acc}}, "samples": {"piqa": [{"lls": pair} for pair in lls]}}


def test_distances_are_the_per_choice_differences_and_the_accuracy_change():
    truth = result([[-1.0, -2.0], [-3.0, -4.0]], 0.5)
    other = result([[-1.5, -2.0], [-3.0, -4.25]], 1.0)
    d = distance(truth, other, "piqa")
    assert d == {"median": pytest.approx(0.125), "p99": pytest.approx(0.4925), "max": 0.5, "acc_diff": 0.5}
    assert compare(truth, truth, other)["piqa"]["within"] and not compare(truth, other, truth)["piqa"]["within"]
    # per document Σ|Δ other| − 0: 0.5 and 0.25; their mean and its standard error
    assert compare(truth, other, truth)["piqa"]["excess"] == {"mean": 0.375, "stderr": pytest.approx(0.125)}
    with pytest.raises(ValueError, match="same --limit"):
        distance(truth, result([[-1.0, -2.0]], 0.5), "piqa")


def test_a_fast_run_as_far_from_float32_as_bf16_by_chance_is_within_and_one_further_is_not():
    """Two independent bf16-sized roundings of the same numbers: one has the larger median |Δ| by chance (the rule
    that fast's median be no larger would refuse it); a rounding twice as coarse is further, and refused."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(-20, 5, size=(2000, 4))
    truth, fast = result(base.tolist(), 0.5), result((base + rng.normal(0, 0.1, base.shape)).tolist(), 0.5)
    bf16 = result((base + rng.normal(0, 0.1, base.shape)).tolist(), 0.5)
    coarse = result((base + rng.normal(0, 0.2, base.shape)).tolist(), 0.5)
    same = compare(truth, fast, bf16)["piqa"]
    assert same["fast"]["median"] > same["bf16"]["median"] and same["within"], same
    assert not compare(truth, coarse, bf16)["piqa"]["within"]


def test_a_document_with_one_continuation_has_one_log_likelihood():
    """LAMBADA's samples carry ``ll`` (one continuation), the choice tasks' ``lls``: both read as a list a document."""
    got = {"samples": {"lambada_openai": [{"ll": -2.5, "greedy": True}], "piqa": [{"lls": [-1.0, -2.0]}]}}
    assert documents(got, "lambada_openai") == [[-2.5]] and documents(got, "piqa") == [[-1.0, -2.0]]
    with pytest.raises(ValueError, match="--samples true"):
        documents(got, "copa")


def test_fast_mode_in_float32_is_within_what_bf16_moves_on_a_tiny_model(tmp_path, eval_model, eval_tokenizer):
    from helpers import EVAL_FIX

    from chop.eval.eval_cli import run

    eval_model.save_pretrained(tmp_path / "m")
    eval_tokenizer.save_pretrained(tmp_path / "m")
    common = dict(model=str(tmp_path / "m"), tasks="piqa,copa,hellaswag", data_dir=str(EVAL_FIX), samples=True,
                  device="cpu", batch_size=4)
    truth = run(**common, dtype="float32")
    bf16 = run(**common, dtype="bfloat16")
    fast = run(**common, dtype="float32", mode="fast")
    agree = compare(truth, fast, bf16)
    assert set(agree) == {"piqa", "copa", "hellaswag"}
    for task, a in agree.items():
        assert a["within"] and a["fast"]["max"] < 1e-4 < a["bf16"]["median"], (task, a)
