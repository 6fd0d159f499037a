"""Fused kernels for training: ``torch`` (the model's own modules) or ``liger`` (liger-kernel's Triton kernels); and
which of PyTorch's attention backends SDPA tries first (``sdpa_backend``).

``liger`` swaps, in a loaded model, RMSNorm, rotary embeddings and the SwiGLU MLP for liger-kernel's fused kernels,
and lets the LM loss use its fused linear cross-entropy (``fused_cross_entropy``): the head and the loss in one
kernel per chunk of tokens, no ``[tokens, vocab]`` logits. The same arithmetic to bf16 rounding
(``tests/unit/models/test_kernels.py``, on a GPU). Triton kernels run on CUDA GPUs only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ContextManager, Literal, Optional, get_args

import torch

log = logging.getLogger(__name__)

Kernels = Literal["torch", "liger"]
# Which backend attention tries first. PyTorch's own order depends on its version and the GPU: on an H200 with torch
# 2.11 it already runs cuDNN's kernels (benchmarks/train_throughput.py records which ran); older versions try flash
# first and reach cuDNN only when asked.
SdpaBackend = Literal["flash", "cudnn", "efficient", "math"]
_SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def sdpa_backend(first: Optional[str]) -> ContextManager:
    """A context in which ``scaled_dot_product_attention`` tries backend ``first`` before the others (which still run
    where it cannot, e.g. a shape it does not support); None: PyTorch's own order. The backward follows the forward."""
    if first is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, _SDPA[first])] + [getattr(SDPBackend, n) for b, n in _SDPA.items() if b != first]
    return sdpa_kernel(order, set_priority=True)


def check_sdpa_backend(first: Optional[str], attn_implementation: Optional[str],
                       field: str = "model.sdpa_backend") -> None:
    """Refuse, before any weights load, a backend that is not one, or one for attention that does not run through
    SDPA."""
    if first is None:
        return
    if first not in _SDPA:
        raise ValueError(f"{field}: '{first}' is not one of {list(_SDPA)}")
    if attn_implementation != "sdpa":
        raise ValueError(f"{field}: '{first}' chooses among PyTorch's SDPA backends, and model.attn_implementation is "
                         f"'{attn_implementation}'; set model.attn_implementation: sdpa, or leave {field} unset")


def check_installed(kernels: str, field: str = "model.kernels") -> None:
    """Refuse an unknown kernel set, or liger's where liger-kernel is not installed; without importing it (seconds)."""
    if kernels == "torch":
        return
    if kernels not in get_args(Kernels):
        raise ValueError(f"{field}: '{kernels}' is not one of {list(get_args(Kernels))}")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(f"{field}: 'liger' needs the liger-kernel package, which is not installed: "
                         f"`pip install liger-kernel` (Triton, CUDA GPUs), or set {field}: torch")


def check_kernels(kernels: str, config: Any, field: str = "model.kernels") -> None:
    """Refuse, before any weights load, kernels that cannot run here: not installed (``check_installed``), or not
    written for the model (which imports liger-kernel)."""
    check_installed(kernels, field)
    if kernels == "torch":
        return
    model_type = config.get_text_config().model_type
    supported = _liger_models()
    if model_type not in supported:
        raise ValueError(f"{field}: liger-kernel has no kernels for model_type '{model_type}' (it has them for "
                         f"{sorted(supported)}); set {field}: torch")


def check_device(kernels: str, device: torch.device, field: str = "model.kernels",
                 first_sdpa: Optional[str] = None) -> None:
    """Refuse liger's kernels, and SDPA backends other than math, on anything but a CUDA device, before the model
    loads."""
    if kernels == "liger" and device.type != "cuda":
        raise ValueError(f"{field}: liger-kernel's Triton kernels run on CUDA GPUs only, and this run's device is "
                         f"'{device.type}'; set {field}: torch, or train on a GPU (trainer.accelerator: gpu)")
    if first_sdpa not in (None, "math") and device.type != "cuda":
        raise ValueError(f"model.sdpa_backend: '{first_sdpa}' runs on CUDA GPUs only, and this run's device is "
                         f"'{device.type}'; leave model.sdpa_backend unset, or train on a GPU")


def apply_kernels(model: Any, kernels: str) -> None:
    """Swap ``model``'s RMSNorm, rotary embeddings and MLP for fused kernels, in place (the weights stay; state dict
    keys and exports are unchanged). liger patches the rotary function of the model's transformers module, so other
    models of the same architecture in this process (a teacher) get it too: the same arithmetic; chop then has it
    take each batch as one row (``rope_as_one_row``)."""
    if kernels == "torch":
        return
    patch = liger("liger_kernel.transformers.monkey_patch")._apply_liger_kernel_to_instance
    # The loss is chop's (fused_cross_entropy below), not a patched forward's.
    patch(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    module = sys.modules.get(type(model).__module__)
    rope = getattr(module, "apply_rotary_pos_emb", None)
    if getattr(rope, "__name__", None) == "liger_rotary_pos_emb":  # liger's, just set (not already wrapped)
        module.apply_rotary_pos_emb = functools.partial(rope_as_one_row, rope)


def rope_as_one_row(rope: Callable, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    position_ids: Any = None, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """liger's rotary function ``rope`` on ``q`` and ``k`` (batch, heads, tokens, head dim) with the batch's rows laid
    end to end as one: its Triton kernel takes the batch size as a compile-time constant, so each new size is a new
    compilation, and evaluation's length-packed batches have dozens of sizes (38 on the suite)."""
    b, n = q.shape[0], q.shape[2]
    if b == 1 or cos.dim() != 3 or unsqueeze_dim != 1:  # (Llama's layout: cos and sin (batch or 1, tokens, dim))
        return rope(q, k, cos, sin, position_ids, unsqueeze_dim)

    def fold(x: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:  # a view, for HF's layout (a transposed view)
        return x.transpose(1, 2).reshape(rows, tokens, x.shape[1], x.shape[3]).transpose(1, 2)

    cos, sin = (c.expand(b, n, c.shape[-1]).reshape(1, b * n, c.shape[-1]) for c in (cos, sin))
    q, k = rope(fold(q, 1, b * n), fold(k, 1, b * n), cos, sin, None, unsqueeze_dim)
    return fold(q, b, n), fold(k, b, n)


_TRITON_KEY = threading.Lock()
ROPE_TOKENS = (256, 255)  # compile_ahead's token counts: divisible by 16 and not


def hash_triton() -> None:
    """Triton's cache key for this process, computed now. Its first compilation or cache lookup in a process hashes
    its compiler and its library, its on-disk cache warm or cold (0.4 s alone on an H200 machine, 1.6 s in `chop
    eval`'s first forward beside the main thread's work; ``triton_key`` keeps the result for the process), and hashing
    runs outside the GIL: a thread can do it while the model loads. A second caller waits for the first's result
    instead of hashing again."""
    with _TRITON_KEY:
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # a Triton without it: its first kernel call hashes, as before
            return
        triton_key()


def compile_ahead(model: Any) -> None:
    """Compile liger's kernels for ``model``'s shapes before its first forward, in threads: a kernel's first call in a
    process compiles it where Triton's on-disk cache lacks it (ptxas, and a launcher built by the system's C compiler:
    0.3 to 0.5 s each on an H200 machine), a forward calls them one after another, and the compilers run outside the
    GIL. One call per distinct patched module, and the rotary function at a token count divisible by 16 and one not
    (it takes the count as an integer, which Triton specialises on that); shapes this misses compile in the forward."""
    hash_triton()
    param = next(model.parameters())
    calls, seen = [], set()
    for module in model.modules():
        # liger patches a model's modules by binding its forward to each (or, for some, by swapping the module)
        forward = getattr(module.__dict__.get("forward", type(module).forward), "__module__", None) or ""
        if not forward.startswith("liger_kernel"):
            continue
        params = list(module.parameters())
        key = (type(module), *(p.shape for p in params))
        if params and key not in seen:
            seen.add(key)  # a norm's weight is (width,), an MLP's first projection (inner, width): its input width
            calls.append(functools.partial(module, param.new_zeros(ROPE_TOKENS[0], params[0].shape[-1])))
    rope = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    if isinstance(rope, functools.partial) and rope.func is rope_as_one_row:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        for t in ROPE_TOKENS:  # HF's layout: (batch, heads, tokens, dim), a transposed view
            q, k = (param.new_zeros(1, t, n, dim).transpose(1, 2)
                    for n in (heads, getattr(config, "num_key_value_heads", None) or heads))
            calls.append(functools.partial(rope, q, k, param.new_zeros(1, t, dim), param.new_zeros(1, t, dim)))
    if not calls:
        return

    def call(fn: Callable) -> None:
        try:
            with torch.inference_mode():  # in each thread: grad mode is thread-local
                fn()
        except Exception as err:  # a module patched with another signature: the forward compiles its kernel
            log.debug("compile_ahead: %s not compiled ahead (%s)", fn, err)

    call(calls[0])  # alone: Triton's first kernel in a process also sets up its driver
    with ThreadPoolExecutor(max(1, len(calls) - 1)) as pool:
        list(pool.map(call, calls[1:]))


def fused_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear,
                        softcap: Optional[float] = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` in liger's fused linear cross-entropy kernel (float32
    accumulation; the logits never exist whole)."""
    loss = liger("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index,
                                                                               reduction="mean", softcap=softcap)
    return loss(head.weight, hidden.flatten(0, -2), targets.flatten(), head.bias)


def _liger_models() -> set[str]:
    return set(liger("liger_kernel.transformers.monkey_patch").MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger(module: str) -> Any:
    """liger-kernel's ``module``, imported without peft: liger imports peft where it is installed, only to recognise
    PEFT-wrapped modules, which chop never builds, and that import was 1.1 of the 1.9 s liger's import took in `chop
    eval`'s model loading on an H200 machine (``benchmarks/liger_import.py``). peft stays importable afterwards."""
    hide = "peft" not in sys.modules and "liger_kernel.utils" not in sys.modules  # not imported yet, by anyone
    if hide:
        sys.modules["peft"] = None  # `import peft` then raises ImportError: liger's PEFT_AVAILABLE is False
    try:
        return importlib.import_module(module)
    finally:
        if hide and "peft" in sys.modules and sys.modules["peft"] is None:
            del sys.modules["peft"]
