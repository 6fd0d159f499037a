"""`chop eval`'s refusals of fused kernels, made before anything loads."""

import pytest
from helpers import TINY, fake_liger
from transformers import AutoConfig

from chop.eval import eval_cli
from chop.models import kernels, loading


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before refusing")

    for name in ("load", "tokenizer_name"):
        monkeypatch.setattr(eval_cli, name, refuse)


def test_fused_kernels_are_refused_in_exact_mode(nothing_loads):
    # Exact mode keeps lm-eval's bits; liger's kernels round otherwise.
    with pytest.raises(ValueError, match="--kernels: 'liger' .* --mode exact"):
        eval_cli.run("no/such-model", tasks="copa", kernels="liger", device="cpu")


def test_fused_kernels_are_refused_off_a_gpu(nothing_loads):
    with pytest.raises(ValueError, match="--kernels: liger-kernel's Triton kernels run on CUDA GPUs only"):
        eval_cli.run("no/such-model", tasks="copa", kernels="liger", mode="fast", device="cpu")


def test_a_model_type_liger_lacks_is_refused_as_the_model_loads_before_its_weights(monkeypatch, tmp_path):
    """Asked in the loading thread, not before the clock starts: it imports liger-kernel (seconds, which there run
    beside the reading and tokenising of the documents)."""
    fake_liger(monkeypatch, ["llama"])
    monkeypatch.setattr(eval_cli, "tokenizer_name", lambda model: (_ for _ in ()).throw(AssertionError("tokenised")))
    imported = []
    monkeypatch.setattr(kernels, "_liger_models", lambda: imported.append(1) or {"llama"})
    with pytest.raises(AssertionError, match="tokenised"):  # up front: installed, fast mode, a CUDA device: no import
        eval_cli.run("no/such-model", tasks="copa", kernels="liger", mode="fast", device="cuda")
    assert not imported
    AutoConfig.for_model(**TINY["gpt2"]).save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(ValueError, match="--kernels: liger-kernel has no kernels for model_type 'gpt2'.*--kernels: torch"):
        eval_cli.load(str(tmp_path), "float32", "cuda", "liger")
