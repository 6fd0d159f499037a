"""Two GPUs: FSDP shards the teacher like the student and resumes exactly; DDP reads every document exactly once.

Needs 2 CUDA devices: ``pytest -m gpu`` on a machine with two GPUs. CI has none and leaves these out.
"""

import json

import pytest
import torch
from conftest import write_corpus
from test_training import DROPOUT, ROOT, TINY, TINY_DISTILL, args, run_cli
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
WORLD = 2
FSDP = {"accelerator": "gpu", "devices": WORLD, "precision": "bf16-mixed", "gradient_clip_val": 1.0,
        "strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                     "init_args": {"auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
                                   "state_dict_type": "full"}}}
TIED = DROPOUT.replace('"attention_dropout": 0.3', '"tie_word_embeddings": true')


def teacher_params(config):
    from chop.models.loading import load_model
    import yaml

    return sum(p.numel() for p in load_model(config=yaml.safe_load(open(config))["model"]["init_args"]["config"]).parameters())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head"])
def test_fsdp_distillation_shards_the_teacher_trains_and_exports(tmp_path, tied):
    extra = [TIED] if tied else []
    shards = ("helpers.RecordSharding", {"path": str(tmp_path / "shards")})
    run_cli(*args(tmp_path, "--trainer.max_steps=8", *extra, callbacks=[shards], config=TINY_DISTILL, trainer=FSDP))
    ranks = [json.loads((tmp_path / f"shards.rank{r}").read_text()) for r in range(WORLD)]
    total = teacher_params(TINY_DISTILL)
    # Each rank holds its shard of the teacher's layers; a head tied to the embeddings keeps the embeddings and the
    # final norm whole on every rank (they are called outside any unit), an untied teacher is sharded throughout.
    replicated = (1100 * 32 + 32) if tied else 0
    expected = total - (1100 * 32 if tied else 0) + (WORLD - 1) * replicated
    held = sum(r["teacher_local"] for r in ranks)
    assert expected <= held <= expected + ranks[0]["teacher_units"] * (WORLD - 1), (held, expected)  # + FSDP's padding
    assert all(0 < r["teacher_local"] < 0.75 * total for r in ranks), ranks
    assert all(r["teacher_units"] >= 6 for r in ranks), ranks  # ... wrapped layer by layer
    assert all(r["teacher_dtypes"] == ["torch.bfloat16"] for r in ranks), ranks
    assert all(r["teacher_training"] is False for r in ranks), ranks
    assert all(r["decayed"] >= 4 * 7 for r in ranks), ranks  # every student layer's 7 matrices, though sharded flat
    ckpt = torch.load(tmp_path / "tiny_cpu_distill" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny_cpu_distill" / "checkpoints" / "hf")
    assert hf.config.num_hidden_layers == 4


# Seen on 2 H200s: the resumed run fails in Lightning's FSDP load_checkpoint, in torch's
# FSDP.optim_state_dict_to_load (_rekey_sharded_optim_state_dict: KeyError on a 'teacher.*' parameter name that the
# saved optimizer state lists although the teacher is frozen and outside the optimizer). Not fixed yet (issue 14).
@pytest.mark.xfail(strict=True, reason="FSDP optimizer-state reload with a frozen teacher: KeyError on teacher names")
def test_fsdp_distillation_resumes_exactly(tmp_path):
    straight, broken = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), broken.mkdir()
    record = lambda d: ("helpers.RecordSteps", {"path": str(d / "steps")})  # noqa: E731
    run_cli(*args(straight, "--trainer.max_steps=8", callbacks=[record(straight)], config=TINY_DISTILL, trainer=FSDP))
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


def test_fsdp_continued_pretraining_trains_and_exports(tmp_path):
    run_cli(*args(tmp_path, "--trainer.max_steps=8", config=TINY, trainer=FSDP))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["chop"]["tokens_seen"] == 8 * WORLD * 4 * 16  # every rank's batch
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.num_hidden_layers == 4


def test_ddp_on_two_gpus_reads_each_document_once_from_its_own_files(tmp_path):
    # 8 files for 2 ranks x 2 workers: each shard reads 2 whole files of 16 one-block documents.
    files = [str(write_corpus(tmp_path / f"c{i}.jsonl", 16, start=16 * i)) for i in range(8)]
    steps = tmp_path / "steps"
    run_cli(*args(tmp_path, "--trainer.accelerator=gpu", "--trainer.strategy=ddp", "--trainer.devices=2",
                  "--trainer.max_steps=16", "--data.seq_len=8", "--data.num_workers=2", "--data.shuffle_buffer=4",
                  f"--data.train_files={json.dumps(files)}", "--data.val_files=null", "--data.val_docs=0",
                  "--trainer.limit_val_batches=0", callbacks=[("helpers.RecordSteps", {"path": str(steps)})]))
    from transformers import AutoTokenizer

    vocab = {v: k for k, v in AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tokenizer").get_vocab().items()}
    seen = []
    for rank in (0, 1):
        rows = [json.loads(line) for line in open(f"{steps}.rank{rank}")]
        assert len(rows) == 16
        seen += [int(vocab[t][1:]) for r in rows for block in r["ids"] for t in block
                 if vocab[t][0] == "d" and vocab[t][1:].isdigit()]
    assert sorted(seen) == list(range(128))  # 2 ranks x 16 steps x 4 blocks: the epoch, each document once
