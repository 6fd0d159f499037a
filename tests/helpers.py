"""Helpers the tests share: tiny configs of every architecture, a word-level tokenizer and corpus, TensorBoard
scalars, `chop fit` argument lists and subprocess runs, and callbacks that tests add to a fit run from the command line
(``--trainer.callbacks+=helpers.X``)."""

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = str(ROOT / "configs" / "tiny_cpu.yaml")
TINY_DISTILL = str(ROOT / "configs" / "tiny_cpu_distill.yaml")
FIX = ROOT / "tests" / "fixtures"
# The pretraining run has dropout: exact only if every rank's random state comes back with the checkpoint.
DROPOUT = ('--model.config={"model_type": "llama", "vocab_size": 1100, "hidden_size": 32, "intermediate_size": 64, '
           '"num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.3, '
           '"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}')


def args(tmp_path, *extra, callbacks=(), config=TINY_CPU, trainer=None):
    """``fit`` on ``config`` (tiny_cpu.yaml) writing under ``tmp_path``, with extra callbacks (class_path, init_args)
    and ``trainer`` settings."""
    cfg = yaml.safe_load(open(config))
    cfg["trainer"].update(trainer or {})
    cfg["model"]["init_args"]["tokenizer"] = str(FIX / "tokenizer")
    cfg["data"]["init_args"].update(train_files=[str(FIX / "train.jsonl")], val_files=[str(FIX / "val.jsonl")])
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"]["callbacks"][2]["init_args"] = {"window_size": 2, "peak_tflops": 0.001}  # MFU on a CPU too
    cfg["trainer"]["callbacks"] += [{"class_path": c, "init_args": a} for c, a in callbacks]
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["fit", "--config", str(path), *extra]


def run_cli(*argv, check=True):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "chop", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return proc


def steps(path):
    return [json.loads(line) for line in open(f"{path}.rank0")]

EVAL_FIX = FIX / "eval"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # chop's offline copy (a dequantised Q4_1 model): real BPE, real text


_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=1, pad_token_id=0)
TINY = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=16, **_COMMON),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=3, **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=8, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=8, sliding_window=16, **_COMMON),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=8, sliding_window=16, **_COMMON),
    "phi3": dict(model_type="phi3", **_COMMON),
    "olmo2": dict(model_type="olmo2", **_COMMON),
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=1, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                     num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    # Layer kinds by index: layer 0 dense, then every second layer sparse (1, 3, 5).
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[0], **_COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[0], **_COMMON),
    "falcon": dict(model_type="falcon", vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                   bos_token_id=1, eos_token_id=1, pad_token_id=0),
    "stablelm": dict(model_type="stablelm", **_COMMON),
    "phi": dict(model_type="phi", **_COMMON),
    "gptj": dict(model_type="gptj", vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=128, rotary_dim=4,
                 bos_token_id=1, eos_token_id=1, pad_token_id=0),
    "bloom": dict(model_type="bloom", vocab_size=128, hidden_size=32, n_layer=6, n_head=4, bos_token_id=1,
                  eos_token_id=1, pad_token_id=0),
    "starcoder2": dict(model_type="starcoder2", **_COMMON),
    "cohere": dict(model_type="cohere", **_COMMON),
}

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "far", "away", "and", "then", "it", "was", "good"]


def fake_liger(monkeypatch, model_types):
    """A stand-in for an installed liger-kernel that has kernels for ``model_types`` (none of them callable)."""
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = dict.fromkeys(model_types)


def make_tokenizer(path: Path, n_doc_ids: int = 1000) -> Path:
    """A word-level fast tokenizer with tokens d0..d{n-1} (document ids) and a few words; EOS is </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    for w in WORDS + [f"d{i}" for i in range(n_doc_ids)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(path)
    return path


def tiny_llama(folder: Path, layers: int = 6) -> Path:
    """A random-init Llama (seeded) with the word-level tokenizer, saved as a Hugging Face directory."""
    from chop.models.loading import load_model

    make_tokenizer(folder)
    load_model(config={**TINY["llama"], "vocab_size": 1100, "num_hidden_layers": layers}).save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_docs: int, words_per_doc: int = 7, field: str = "text", start: int = 0) -> Path:
    """Documents 'd<i> w w w ...' — each exactly ``words_per_doc + 1`` tokens plus EOS."""
    with open(path, "w") as f:
        for i in range(start, start + n_docs):
            words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(words_per_doc)]
            f.write(json.dumps({field: " ".join([f"d{i}", *words])}) + "\n")
    return path


LLAMA = dict(TINY["llama"], vocab_size=1100)


def distill(**kw):
    """A configured Distillation module of the tiny Llama, outside a Trainer (teacher float32 on the CPU)."""
    from chop.training.distill import Distillation

    module = Distillation(config=kw.pop("config", LLAMA), tokenizer=str(FIX / "tokenizer"), attn_implementation="eager", **kw)
    module.configure_model()
    return module


def batch(seed=0, shape=(2, 12)):
    x = torch.randint(2, 1100, shape, generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def scalars(logdir):
    """Every scalar in a TensorBoard log directory, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for ev in sorted(Path(logdir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


class RecordSteps(Callback):
    """Appends one json line per training step: global step, loss, the logged train/* values, a hash of the batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch["input_ids"].cpu().numpy()
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"]),
                                "batch": hashlib.sha1(ids.tobytes()).hexdigest(), "ids": ids.tolist(),
                                "logged": {k: float(v) for k, v in trainer.callback_metrics.items()
                                           if k.startswith("train/")}}) + "\n")


class KillAt(Callback):
    """Ends the process abruptly when step ``step`` is about to run (checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(3)


class NanFrom(Callback):
    """From step ``step`` on, the input embeddings come out NaN, so the loss and every gradient are not finite: a run
    that diverged, at a step that does not depend on the kernels (a huge learning rate's first bad step does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out * float("nan"))


class RecordSharding(Callback):
    """Writes, per rank, how much of the teacher and the student this rank holds once the strategy has set up."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        def local(module):
            return sum(p.numel() for p in module.parameters())

        with open(f"{self.path}.rank{trainer.global_rank}", "w") as f:
            json.dump({"teacher_local": local(pl_module.teacher), "student_local": local(pl_module.model),
                       "teacher_units": sum(isinstance(m, FullyShardedDataParallel) for m in pl_module.teacher.modules()),
                       "teacher_dtypes": sorted({str(p.dtype) for p in pl_module.teacher.parameters()}),
                       "teacher_training": any(m.training for m in pl_module.teacher.modules()),
                       "decayed": len(trainer.optimizers[0].param_groups[0]["params"])}, f)


from lightning.pytorch.strategies import FSDPStrategy as _FSDPStrategy


class CPUFSDP(_FSDPStrategy):
    """Lightning's FSDP strategy, allowed on CPU processes (gloo): Lightning refuses ``FSDPStrategy`` itself without
    a GPU, but torch's FSDP runs on CPU, so the sharding and checkpoint logic can be tested where CI runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import lightning.pytorch.strategies.fsdp as strategy

        strategy._get_full_state_dict_context = _full_state_dict_on_cpu

    def _setup_model(self, model):
        import torch
        import torch.distributed.fsdp as fsdp

        real = fsdp.FullyShardedDataParallel

        class OnCPU(real):  # Lightning passes device_id=None on CPU, which FSDP refuses; the units inherit it
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=torch.device("cpu"), **kwargs)

        fsdp.FullyShardedDataParallel = OnCPU
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = real


def _full_state_dict_on_cpu(module, world_size, rank0_only=True):
    """Lightning's full state-dict context without ``offload_to_cpu``, which assumes GPU tensors: on CPU, FSDP's
    offload frees the very storage the model's state dict holds (a segfault), and ``.cpu()`` copies nothing, so every
    optimizer state of a parameter (Adam's two moments) would be one view of a reused gather buffer."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))
