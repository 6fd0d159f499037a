"""Pruned models that any Hugging Face tool loads: uniform widths as a standard config (plain ``from_pretrained``), and
per-layer widths with the ``modeling_chop.py`` written beside them (``trust_remote_code``), both in a process that
cannot import chop; and lm-evaluation-harness's ``--model hf`` scoring the per-layer export as chop does."""

import json
import os
import subprocess
import sys

import torch
from helpers import EVAL_FIX, TINY

from chop.models.checkpoint import save_model
from chop.models.loading import load_model, load_tokenizer
from chop.pruning.surgeon import Surgeon

# Runs in a fresh interpreter that cannot import chop (and outside the repository): it loads each folder and prints
# whether its logits equal the ones chop's model gave.
WITHOUT_CHOP = """
import json, sys
sys.modules["chop"] = None
import torch
from transformers import AutoModelForCausalLM
for folder, remote in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    saved = torch.load(folder + "/want.pt")
    with torch.no_grad():
        print(type(model).__name__, torch.equal(model(input_ids=saved["ids"]).logits, saved["logits"]))
"""


def pruned(folder, uniform, vocab=128, tokenizer=None):
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=3, vocab_size=vocab)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(2, vocab, (2, 17), generator=g) for _ in range(2)]
    Surgeon(sparsity=0.3, shots=2, align=4 if uniform else 1, uniform=uniform).prune(model, calib)
    save_model(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    ids = torch.randint(2, vocab, (2, 9))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, folder / "want.pt")
    return model


def test_uniform_and_per_layer_exports_load_without_chop(tmp_path):
    uniform, per_layer = pruned(tmp_path / "uniform", True), pruned(tmp_path / "per_layer", False)
    assert not hasattr(uniform.config, "chop_widths") and not (tmp_path / "uniform" / "modeling_chop.py").exists()
    assert len({w["intermediate_size"] for w in per_layer.config.chop_widths}) > 1
    folders = [(str(tmp_path / "uniform"), False), (str(tmp_path / "per_layer"), True)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", WITHOUT_CHOP, json.dumps(folders)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["LlamaForCausalLM", "True", "ChopLlamaForCausalLM", "True"]


def test_lm_eval_scores_the_per_layer_export_as_chop_does(tmp_path, eval_tokenizer):
    from chop.eval.reference import run_lm_eval
    from chop.eval.suite import evaluate

    folder = tmp_path / "per_layer"
    pruned(folder, False, vocab=len(eval_tokenizer), tokenizer=eval_tokenizer)
    tasks = ["piqa", "arc_easy"]
    ours = evaluate(load_model(str(folder)), load_tokenizer(str(folder)), tasks, limit=5, data_dir=str(EVAL_FIX))
    theirs = run_lm_eval(str(folder), tasks, limit=5, data_dir=str(EVAL_FIX), trust_remote_code=True)
    for name, result in ours.items():
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == result.n == 5
        for mine, ref in zip(result.samples, samples):
            theirs_lls = [float(r[0]) for r in ref["filtered_resps"]]
            assert len(mine["lls"]) == len(theirs_lls) and \
                max(abs(a - b) for a, b in zip(mine["lls"], theirs_lls)) < 1e-4, name  # float32: as the agreement test
        assert result.metrics["acc"] == theirs["results"][name]["acc,none"]
