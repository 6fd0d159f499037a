"""chop's zero-shot numbers against lm-evaluation-harness's on the same model and documents (CPU).

float32: SmolLM2-135M-Instruct as an HF directory, every task with an offline copy, the first 30 documents (about
1,000 requests), and MMLU, the first document of each of its 57 subjects. bf16: the same model LayerChop'd to 8 of its
30 layers (Just CHOP's rule, kept [0, 23..29]: what chop hands lm-eval after a chop) on the first 8 documents of each
task (about 250 requests): a CPU without AVX-512 has no bf16 matrix kernels (torch falls back to loops about 10x
slower than float32's), where the whole model at 24 documents took 22 of make test's 52 minutes. 8 documents catch other
batches: chop's own bf16 numbers for this model at batch size 16 instead of 32 differ in 5 of these 88 documents, in 4
tasks (checked on 2 CPUs). lm-eval 0.4.13 with ``--model hf`` and its own task definitions, its dataset loading
pointed at the same rows, both at batch size 32. acc/acc_norm must be equal; per-example log-likelihoods within 1e-4
in float32, and in bf16 equal bit for bit (lm-eval rounds them to bf16; chop rounds the same way and, with lm-eval's
batch size, runs the same batches, which CPU kernels need for the same bits). The float32 model is the whole one: a
chopped SmolLM2 predicts no LAMBADA word (its accuracy 0), which would leave lm-eval's greedy check untested."""

import pytest

from chop.eval.reference import run_lm_eval, samples_of
from chop.eval.suite import evaluate
from chop.models.loading import load_model, load_tokenizer, resolve
from chop.pruning.layerchop import LayerChop, chop

pytestmark = pytest.mark.slow


SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


OFFLINE = ["piqa", "hellaswag", "openbookqa", "winogrande", "sciq", "arc_easy", "arc_challenge", "boolq", "copa", "rte",
           "lambada_openai"]


@pytest.fixture(scope="module", params=[(OFFLINE, 30, "float32", None), (["mmlu"], 1, "float32", None),
                                        (OFFLINE, 8, "bfloat16", 8)], ids=["tasks", "mmlu", "tasks-bf16-chopped"])
def both(request, tmp_path_factory):
    tasks, limit, dtype, keep = request.param
    model = resolve(SMOL)
    if keep:  # chop's LayerChop, saved as the HF directory both engines read
        net = load_model(SMOL)
        chop(net, LayerChop("input", n_keep=keep))
        model = tmp_path_factory.mktemp("chopped")
        net.save_pretrained(model)
        load_tokenizer(SMOL).save_pretrained(model)
    ours = evaluate(load_model(str(model), dtype=dtype), load_tokenizer(str(model)), tasks, limit=limit, batch_size=32)
    theirs = run_lm_eval(str(model), tasks, limit=limit, batch_size=32, dtype=dtype)
    return ours, theirs, limit, dtype


def test_metrics_equal_lm_eval(both):
    ours, theirs, limit, dtype = both
    for name, result in ours.items():
        assert result.n == (limit if name != "mmlu" else 57 * limit)  # MMLU: `limit` of each of its 57 subjects
        for metric, value in result.metrics.items():
            reference = theirs["results"][name][f"{metric},none"]
            if metric == "perplexity" and dtype == "float32":
                assert value == pytest.approx(reference, rel=1e-4), name
            else:
                assert value == reference, (name, metric, value, reference)


def test_per_example_loglikelihoods_agree(both):
    """float32: within 1e-4, or 1e-6 of the log-likelihood for long continuations (the float32 resolution of a sum
    over hundreds of tokens); bf16: equal. The largest difference per task is printed."""
    ours, theirs, _, dtype = both
    tolerance = (1e-4, 1e-6) if dtype == "float32" else (0.0, 0.0)
    bad = []
    for name, result in ours.items():
        samples = samples_of(theirs, name)  # MMLU: lm-eval's lists per subject, pooled as ours in subject order
        assert len(samples) == result.n, name
        worst, worst_rel = 0.0, 0.0
        for mine, ref in zip(result.samples, samples):
            lls = mine["lls"] if "lls" in mine else [mine["ll"]]
            theirs_lls = [float(r[0]) for r in ref["filtered_resps"]]
            assert len(lls) == len(theirs_lls), name
            for a, b in zip(lls, theirs_lls):
                worst = max(worst, abs(a - b))
                worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1.0))
                if abs(a - b) > tolerance[0] + tolerance[1] * abs(b):
                    bad.append((name, a, b))
        print(f"{name}: largest per-example difference {worst:.2e} (relative {worst_rel:.2e})")
    assert not bad, bad[:5]
