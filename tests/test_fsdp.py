"""FSDP: the teacher is sharded like the student, checkpoints leave it out, resumed runs repeat their steps.

Needs CUDA: ``pytest -m gpu tests/test_fsdp.py`` shards over 2 GPUs where there are 2 (on one GPU FSDP still wraps,
gathers, clips and reloads, with one shard). CI has no GPU and leaves these out.
"""

import json

import pytest
import torch
from test_training import TINY, TINY_DISTILL, args, run_cli
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
WORLD = min(2, torch.cuda.device_count())
FSDP = {"accelerator": "gpu", "devices": WORLD, "precision": "bf16-mixed", "gradient_clip_val": 1.0,
        "strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                     "init_args": {"auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
                                   "state_dict_type": "full"}}}


def teacher_params(config):
    from chop.models.loading import load_model
    import yaml

    return sum(p.numel() for p in load_model(config=yaml.safe_load(open(config))["model"]["init_args"]["config"]).parameters())


def test_fsdp_distillation_shards_the_teacher_and_resumes_exactly(tmp_path):
    straight, broken = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), broken.mkdir()
    record = lambda d: ("helpers.RecordSteps", {"path": str(d / "steps")})  # noqa: E731
    shards = ("helpers.RecordSharding", {"path": str(straight / "shards")})
    run_cli(*args(straight, "--trainer.max_steps=8", callbacks=[record(straight), shards], config=TINY_DISTILL,
                  trainer=FSDP))
    ranks = [json.loads((straight / f"shards.rank{r}").read_text()) for r in range(WORLD)]
    total = teacher_params(TINY_DISTILL)
    assert sum(r["teacher_local"] for r in ranks) == total  # each rank holds its shard of the teacher ...
    assert all(0 < r["teacher_local"] < total for r in ranks) or WORLD == 1
    assert all(r["teacher_units"] >= 6 for r in ranks), ranks  # ... wrapped layer by layer
    assert all(r["teacher_dtypes"] == ["torch.bfloat16"] for r in ranks), ranks
    assert all(r["teacher_training"] is False for r in ranks), ranks

    killed = run_cli(*args(broken, "--trainer.max_steps=8", callbacks=[record(broken), ("helpers.KillAt", {"step": 4})],
                           config=TINY_DISTILL, trainer=FSDP), check=False)
    assert killed.returncode != 0
    run_cli(*args(broken, "--trainer.max_steps=8", "--ckpt_path=last", callbacks=[record(broken)], config=TINY_DISTILL,
                  trainer=FSDP))
    for rank in range(WORLD):
        a = [json.loads(line) for line in open(straight / f"steps.rank{rank}")]
        b = [json.loads(line) for line in open(broken / f"steps.rank{rank}")]
        assert [s["step"] for s in b] == list(range(1, 9)) and [s["batch"] for s in a] == [s["batch"] for s in b]
        for x, y in zip(a, b):
            for k in ("train/loss", "train/lm", "train/logits", "train/hidden", "train/flops"):
                assert x["logged"][k] == pytest.approx(y["logged"][k], rel=1e-4, abs=1e-5), (rank, x["step"], k)

    ckpt = torch.load(broken / "tiny_cpu_distill" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    hf = AutoModelForCausalLM.from_pretrained(broken / "tiny_cpu_distill" / "checkpoints" / "hf")
    assert hf.config.num_hidden_layers == 4


def test_fsdp_continued_pretraining_trains_and_exports(tmp_path):
    run_cli(*args(tmp_path, "--trainer.max_steps=8", config=TINY, trainer=FSDP))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["chop"]["tokens_seen"] == 8 * WORLD * 4 * 16  # every rank's batch
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.num_hidden_layers == 4
