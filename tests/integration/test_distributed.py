"""Several processes: FSDP (teacher and student sharded, exact resume, zero-shot scoring on the sharded model), DDP
(each document once), pruning over ranks (the single-process result), and the 8-GPU recipes shrunk to two."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import (
    DROPOUT,
    FIX,
    ROOT,
    TINY_CPU,
    TINY_DISTILL,
    args,
    run_cli,
    tiny_llama,
    write_corpus,
)
from transformers import AutoModelForCausalLM

WORLD = 2


TWO_GPUS = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs")]


PLACES = {"cpu": [pytest.mark.slow], "gpu": TWO_GPUS}


LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


def places(*which):
    return pytest.mark.parametrize("place", [pytest.param(p, marks=PLACES[p], id=p) for p in which])


def fsdp(place, precision=None):
    """Lightning's FSDP on 2 GPUs (bf16-mixed), or on 2 CPU processes (float32; Lightning's own strategy refuses
    the CPU, ``helpers.CPUFSDP`` is the same strategy allowed there)."""
    strategy = "lightning.pytorch.strategies.FSDPStrategy" if place == "gpu" else "helpers.CPUFSDP"
    return {"accelerator": "gpu" if place == "gpu" else "cpu", "devices": WORLD,
            "precision": precision or ("bf16-mixed" if place == "gpu" else "32-true"), "gradient_clip_val": 1.0,
            "strategy": {"class_path": strategy,
                         "init_args": {"auto_wrap_policy": [LLAMA_LAYER], "state_dict_type": "full"}}}


TIED = DROPOUT.replace('"attention_dropout": 0.3', '"tie_word_embeddings": true')


def teacher_params(config):
    from chop.models.loading import load_model

    return sum(p.numel() for p in load_model(config=yaml.safe_load(open(config))["model"]["init_args"]["config"]).parameters())


def prune_cli(place, world, *argv):
    """``chop prune`` in one process, or under torchrun in ``world``."""
    launch = [sys.executable, "-m", "chop"]
    if world > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "chop"]
    device = [] if place == "gpu" else ["--device", "cpu"]
    proc = subprocess.run([*launch, "prune", *argv, *device], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def shrunk_recipe(tmp_path, recipe, model_dir):
    """An 8-GPU Just CHOP recipe as written (strategy, precision, accumulation, clipping, activation checkpointing,
    losses), on 2 GPUs: the model a random-init Llama of 8 layers (keeping half, as the recipe keeps 16 of 32), the
    data local C4-like files, a few steps."""
    cfg = yaml.safe_load(open(ROOT / "recipes" / "just_chop" / f"{recipe}.yaml"))
    model = cfg["model"]["init_args"]
    model["name"] = str(model_dir)
    model["chop"]["n_keep"] = 4
    data = cfg["data"]["init_args"]
    for key in ("path", "config_name", "val_split"):
        data.pop(key, None)
    data.update(train_files=[str(write_corpus(tmp_path / "c4-train.jsonl", 400))],
                val_files=[str(write_corpus(tmp_path / "c4-val.jsonl", 40, start=500))],
                seq_len=32, batch_size=4, num_workers=2, shuffle_buffer=50, val_blocks=8)
    trainer = cfg["trainer"]
    trainer.update(devices=WORLD, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1,
                   enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, trainer["logger"]["init_args"]["name"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head"])
@places("gpu")
def test_fsdp_distillation_shards_the_teacher_trains_and_exports(tmp_path, tied, place):
    extra = [TIED] if tied else []
    shards = ("helpers.RecordSharding", {"path": str(tmp_path / "shards")})
    run_cli(*args(tmp_path, "--trainer.max_steps=8", *extra, callbacks=[shards], config=TINY_DISTILL, trainer=fsdp(place)))
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


@places("cpu", "gpu")
def test_fsdp_distillation_resumes_exactly(tmp_path, place):
    # A resumed run builds the student before the teacher; a new one had copied the teacher first. FSDP keys a full
    # optimizer state by the order of all parameters, so the resume failed (KeyError on a teacher name) until both
    # orders agreed.
    straight, broken = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), broken.mkdir()
    record = lambda d: ("helpers.RecordSteps", {"path": str(d / "steps")})  # noqa: E731
    trainer = fsdp(place)
    run_cli(*args(straight, "--trainer.max_steps=8", callbacks=[record(straight)], config=TINY_DISTILL, trainer=trainer))
    killed = run_cli(*args(broken, "--trainer.max_steps=8", callbacks=[record(broken), ("helpers.KillAt", {"step": 4})],
                           config=TINY_DISTILL, trainer=trainer), check=False)
    assert killed.returncode != 0
    run_cli(*args(broken, "--trainer.max_steps=8", "--ckpt_path=last", callbacks=[record(broken)], config=TINY_DISTILL,
                  trainer=trainer))
    for rank in range(WORLD):
        a = [json.loads(line) for line in open(straight / f"steps.rank{rank}")]
        b = [json.loads(line) for line in open(broken / f"steps.rank{rank}")]
        assert [s["step"] for s in b] == list(range(1, 9)) and [s["batch"] for s in a] == [s["batch"] for s in b]
        for x, y in zip(a, b):
            for k in ("train/loss", "train/lm", "train/logits", "train/hidden", "train/flops"):
                assert x["logged"][k] == pytest.approx(y["logged"][k], rel=1e-4, abs=1e-5), (rank, x["step"], k)


@places("gpu")
def test_fsdp_continued_pretraining_trains_and_exports(tmp_path, place):
    run_cli(*args(tmp_path, "--trainer.max_steps=8", config=TINY_CPU, trainer=fsdp(place)))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["callbacks"]["ComputeAccounting"]["tokens"] == 8 * WORLD * 4 * 16  # every rank's batch
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.num_hidden_layers == 4


@places("cpu", "gpu")
def test_zero_shot_callback_on_the_sharded_model_gives_the_unsharded_numbers(tmp_path, place):
    # float32 and one row a batch: the sharded model's forward is then the unsharded one's, bit for bit.
    tasks = "piqa,copa,lambada_openai"
    cb = ("chop.ZeroShotEvalCallback", {"tasks": tasks, "data_dir": str(FIX / "eval"), "batch_size": 1})
    run_cli(*args(tmp_path, "--trainer.max_steps=4", "--model.export_on_end=false", callbacks=[cb], config=TINY_CPU,
                  trainer=fsdp(place, precision="32-true")))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    sharded = json.loads((run / "eval-step=4.json").read_text())
    assert sharded["results"]["copa"]["n"] == 6
    out = tmp_path / "unsharded.json"
    run_cli("eval", "--model", str(run / "last.ckpt"), "--tasks", tasks, "--data_dir", str(FIX / "eval"),
            "--batch_size", "1", "--dtype", "float32", "--device", "cuda" if place == "gpu" else "cpu", "--output", str(out))
    unsharded = json.loads(out.read_text())["results"]
    for task, metrics in unsharded.items():
        for name, value in metrics.items():
            assert sharded["results"][task][name] == pytest.approx(value, rel=1e-5), (task, name)


@places("cpu")
def test_ddp_reads_every_document_exactly_once(tmp_path, place):
    corpus = write_corpus(tmp_path / "c.jsonl", 64)  # 64 documents of exactly one block each (seq_len 8)
    steps = tmp_path / "steps"
    run_cli(*args(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=8",
                  "--data.seq_len=8", f"--data.train_files=[{corpus}]", "--data.val_files=null", "--data.val_docs=0",
                  "--trainer.limit_val_batches=0", callbacks=[("helpers.RecordSteps", {"path": str(steps)})]))
    from transformers import AutoTokenizer

    vocab = {v: k for k, v in AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tokenizer").get_vocab().items()}
    seen = {}
    for rank in (0, 1):
        rows = [json.loads(line) for line in open(f"{steps}.rank{rank}")]
        assert len(rows) == 8
        seen[rank] = [int(vocab[t][1:]) for r in rows for block in r["ids"] for t in block
                      if vocab[t][0] == "d" and vocab[t][1:].isdigit()]
    assert len(seen[0]) == len(seen[1]) == 32
    assert sorted(seen[0] + seen[1]) == list(range(64))


@places("gpu")
def test_ddp_on_two_gpus_reads_each_document_once_from_its_own_files(tmp_path, place):
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


@places("cpu", "gpu")
def test_surgeon_on_two_ranks_prunes_as_one_process_does(tmp_path, place):
    # Each rank gathers curvature on half the calibration batches; the sums over ranks are the one process's.
    from safetensors.torch import load_file

    src = tiny_llama(tmp_path / "src")
    common = ["--model", str(src), "--pruning.mode", "structured", "--pruning.sparsity", "0.3", "--pruning.shots", "2",
              "--pruning.calibration_samples", "8", "--pruning.seq_len", "16", "--pruning.batch_size", "2",
              "--calibration.files", f"[{FIX / 'train.jsonl'}]", "--held_out.files", f"[{FIX / 'val.jsonl'}]",
              "--held_out_blocks", "4"]
    prune_cli(place, 1, *common, "--out", str(tmp_path / "one"))
    prune_cli(place, WORLD, *common, "--out", str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("one", "two"))
    assert one["kept"] == two["kept"] and one["params_after"] == two["params_after"] < one["params_before"]
    assert two["shots"][-1]["ppl"] == pytest.approx(one["shots"][-1]["ppl"], rel=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("recipe", ["llama2_7b_layerchop_input", "llama2_7b_layerchop_input_distill"])
@places("gpu")
def test_just_chop_recipe_runs_on_two_gpus_and_resumes(tmp_path, recipe, place):
    config, name = shrunk_recipe(tmp_path, recipe, tiny_llama(tmp_path / "llama", layers=8))
    run_cli("fit", "--config", str(config), "--trainer.max_steps=4")
    run = tmp_path / name / "checkpoints"
    first = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 4 and first["chop"]["plan"]["kept"] == [0, 5, 6, 7]
    # 4 optimizer steps x 2 micro-batches (accumulate_grad_batches) x 2 GPUs x 4 sequences x 32 tokens
    assert first["callbacks"]["ComputeAccounting"]["tokens"] == 4 * 2 * WORLD * 4 * 32
    run_cli("fit", "--config", str(config), "--trainer.max_steps=6", "--ckpt_path=last")
    resumed = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["callbacks"]["ComputeAccounting"]["tokens"] == 6 * 2 * WORLD * 4 * 32
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.num_hidden_layers == 4


@places("gpu")
def test_llm_surgeon_7b_recipe_runs_on_two_gpus(tmp_path, place):
    cfg = yaml.safe_load(open(ROOT / "recipes" / "llm_surgeon" / "llama2_7b_structured_30.yaml"))
    cfg.update(model=str(tiny_llama(tmp_path / "llama", layers=8)), out=str(tmp_path / "pruned"), held_out_blocks=4,
               calibration={"files": [str(FIX / "train.jsonl")]}, held_out={"files": [str(FIX / "val.jsonl")]})
    cfg["pruning"].update(calibration_samples=8, seq_len=16)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    prune_cli(place, WORLD, "--config", str(tmp_path / "recipe.yaml"))
    report = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert len(report["shots"]) == cfg["pruning"]["shots"]
    assert 1 - report["params_after"] / report["params_before"] == pytest.approx(0.3, abs=0.03)
    from chop.models.loading import (
        load_model,  # per-layer widths: chop's loader reads them
    )

    pruned = load_model(str(tmp_path / "pruned"))
    assert sum(p.numel() for n, p in pruned.named_parameters() if "_proj" in n) == report["params_after"]
