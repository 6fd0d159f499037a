"""`chop eval`'s refusals of fused kernels, made before anything loads."""

import pytest

from chop.eval import eval_cli


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

