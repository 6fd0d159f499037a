"""`chop eval`'s refusals of fused kernels, made before anything loads; its scoring of each task as its tokens come."""

import threading
from concurrent.futures import ThreadPoolExecutor

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



def test_each_task_is_scored_once_its_tokens_are_ready_and_the_results_keep_the_tasks_order():
    """On a GPU, chop eval tokenises task after task in a thread and scores each as soon as its tokens are there:
    here the large task's tokens come only once the small task is scored, so scoring overlaps tokenising."""
    clock, small_scored, scored = eval_cli.Clock(), threading.Event(), []

    def tokenise(name):
        if name == "large":
            assert small_scored.wait(10), "the small task was not scored while the large one tokenised"
        return name

    def score(names):
        (name,) = names
        scored.append((name, encoded[name].done() if name in encoded else None))
        if name == "small":
            small_scored.set()
        return {name: f"result of {name}"}

    with ThreadPoolExecutor(1) as pool:
        encoded = {name: pool.submit(clock.time, f"tokenise {name}", tokenise, name) for name in ("small", "large")}
        results = eval_cli.score_by_task(clock, encoded, ["large", "perplexity", "small"], score)
    assert scored == [("small", True), ("large", True), ("perplexity", None)]  # each after its tokens, none before
    assert results == {name: f"result of {name}" for name in ("large", "perplexity", "small")}
    assert list(results) == ["large", "perplexity", "small"]  # the order asked for
    assert set(clock.phases) == {"tokenise (beside scoring)", "wait for tokens", "score"}
    assert clock.phases["wait for tokens"] > 0
