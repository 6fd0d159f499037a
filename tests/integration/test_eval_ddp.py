"""The zero-shot engine in two CPU processes (gloo): each scores a share of the requests, all get every result, and
the numbers are those of one process."""

import json
import os

import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import EVAL_FIX, TINY

from chop.eval.suite import evaluate
from chop.models.loading import load_model, load_tokenizer

TASKS = "piqa,winogrande,mmlu,lambada_openai"


def _model(tokenizer):
    return load_model(config=dict(TINY["llama"], vocab_size=len(tokenizer), max_position_embeddings=512), seed=3).eval()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import chop.eval.engine as engine

    scored = []
    real = engine.Scorer._score_batch
    engine.Scorer._score_batch = lambda self, batch: (scored.append(len(batch)), real(self, batch))[1]
    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    results = evaluate(_model(tokenizer), tokenizer, TASKS, data_dir=EVAL_FIX, batch_size=4)
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"rows": sum(scored), "samples": {k: r.samples for k, r in results.items()},
                   "metrics": {k: r.metrics for k, r in results.items()}}, f)
    dist.destroy_process_group()


def test_two_ranks_split_the_requests_and_agree_with_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "r")), nprocs=2)
    ranks = [json.loads((tmp_path / f"r.rank{r}").read_text()) for r in (0, 1)]
    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    single = evaluate(_model(tokenizer), tokenizer, TASKS, data_dir=EVAL_FIX, batch_size=4)
    for rank in ranks:
        assert rank["metrics"] == {k: r.metrics for k, r in single.items()}
        for name, r in single.items():
            for a, b in zip(rank["samples"][name], r.samples):
                got, want = (a.get("lls") or [a["ll"]]), (b.get("lls") or [b["ll"]])
                assert max(abs(x - y) for x, y in zip(got, want)) < 1e-4, name
    assert abs(ranks[0]["rows"] - ranks[1]["rows"]) <= 1 and ranks[0]["rows"] > 0  # each scored half the rows
