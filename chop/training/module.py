"""What every chop training module shares: the model it builds (load, chop, prune: ``build_student``, or a
checkpoint's architecture on resume), the optimizer and schedule, skipped non-finite steps, compute accounting, exact
resume (checkpointed random state), and the Hugging Face export at the end. ``ContinuedPretraining`` (and distillation)
and ``PromptClassification`` add their own steps, losses and metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from transformers import AutoConfig, PreTrainedModel

from chop.models.checkpoint import CKPT_KEY, config_differences, export_hf, read_checkpoint_meta
from chop.models.kernels import (Kernels, SdpaBackend, apply_kernels, check_device, check_kernels, check_sdpa_backend,
                                 sdpa_backend)
from chop.models.loading import DTYPES, from_config, load_config, load_model
from chop.models.precision import ResidualDtype, check_residual_dtype, residual_in_bf16
from chop.models.registry import num_layers, output_head
from chop.pruning.layerchop import ChopPlan, LayerChop
from chop.pruning.pruner import CalibrationData, refusal
from chop.pruning.registry import Pruning, pruner_from
from chop.pruning.student import build_student
from chop.training import optim
from chop.training.callbacks import ComputeAccounting, ComputeBudget
from chop.training.flops import ModelSize

log = logging.getLogger(__name__)

class CausalLMModule(L.LightningModule):
    """Loads ``name`` (hub id or directory) or a random-init ``config``, chops and prunes it, and trains all its weights.

    Args:
        name: hub id or local directory of the source model.
        tokenizer: tokenizer id/directory when it differs from ``name`` (e.g. a random-init ``config``).
        config: a config dict with ``model_type`` for a random-init model, or overrides of ``name``'s config.
        dtype: parameter dtype (``float32`` with ``bf16-mixed`` precision on GPU is the usual choice).
        attn_implementation: ``sdpa``, ``flash_attention_2`` or ``eager``.
        sdpa_backend: which of PyTorch's SDPA backends attention tries first (``flash``, ``cudnn``, ``efficient``,
            ``math``; the others still run where it cannot); unset: PyTorch's own order (on an H200 with torch 2.11:
            cuDNN's first).
        chop: which layers to delete before training (None: train the model as it is).
        pruning: a pruning method (``method``: surgeon, obd, magnitude, wanda, activation; ``chop.pruning.registry``)
            applied to the (chopped) model before training, calibrated on ``pruning.calibration_samples`` sequences
            of the training data. Structured pruning leaves smaller matrices; unstructured and n:m zeros stay zero
            through training (the mask is kept).
        optim: optimizer and learning-rate schedule.
        compile: run the forward through ``torch.compile``.
        kernels: ``torch`` (the model's own modules) or ``liger``: liger-kernel's fused RMSNorm, rotary embeddings,
            SwiGLU and, for the LM loss, fused linear cross-entropy (CUDA GPUs; ``chop.models.kernels``); with
            ``compile``, the fused cross-entropy alone (Inductor fuses the rest).
        residual_dtype: the residual stream's dtype under ``precision: bf16-mixed``: ``float32`` (autocast's: the
            embeddings' output is float32, and each linear casts its input to bf16 again) or ``bfloat16`` (the
            embeddings' output cast once, as Megatron-LM and FSDP2's mixed precision keep it: less memory traffic,
            other rounding; ``chop.models.precision``). Needs ``trainer.precision: bf16-mixed``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        export_on_end: at the end of ``fit``, write the model and tokenizer as a Hugging Face directory
            ``hf/`` beside the checkpoints.
        max_nonfinite_steps: optimizer steps in a row whose gradients are not finite (NaN/inf loss, overflow) before
            training stops with an error; such steps are skipped (no update), so checkpoints keep the last good weights.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        tokenizer: Optional[str] = None,
        config: Optional[dict] = None,
        dtype: str = "float32",
        attn_implementation: Optional[str] = "sdpa",
        chop: Optional[LayerChop] = None,
        pruning: Optional[Pruning] = None,
        optim: optim.Optim = optim.Optim(),
        compile: bool = False,
        kernels: Kernels = "torch",
        residual_dtype: ResidualDtype = "float32",
        sdpa_backend: Optional[SdpaBackend] = None,
        gradient_checkpointing: bool = False,
        export_on_end: bool = True,
        max_nonfinite_steps: int = 3,
    ) -> None:
        super().__init__()
        chop = LayerChop(**chop) if isinstance(chop, dict) else chop  # Python callers may pass plain dicts
        pruning = pruner_from(pruning)
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype: '{dtype}' is not one of {list(DTYPES)}")
        if name is None and not (config and "model_type" in config):
            raise ValueError("model.name: give a hub id or directory, or model.config with a model_type for random init")
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps: {max_nonfinite_steps} must be >= 1")
        self.save_hyperparameters()
        for key, value in list(self.hparams.items()):  # plain data, so that checkpoints load with weights_only=True
            if dataclasses.is_dataclass(value):
                self.hparams[key] = dataclasses.asdict(value)
        # LightningCLI stores its config (plain dicts) as hparams: keep the typed arguments themselves too.
        self.name, self.config_overrides, self.dtype_name, self.attn = name, config, dtype, attn_implementation
        self.chop_spec, self.optim_cfg, self.tokenizer_name = chop, optim, tokenizer or name
        self.compile_forward, self.gradient_checkpointing, self.export_on_end = compile, gradient_checkpointing, export_on_end
        self.kernels, self.sdpa_backend, self.residual_dtype = kernels, sdpa_backend, residual_dtype
        self.max_nonfinite_steps = max_nonfinite_steps
        self.resume_checkpoint: Optional[str] = None  # set by `chop fit --ckpt_path`: the architecture comes from it
        self._nonfinite_steps = 0
        # The random state after the last training step's forward, set again as the next step starts: what
        # runs in between (validation's data iterators, a checkpoint's reload) cannot shift dropout, so a resumed run
        # draws the very numbers an uninterrupted one draws.
        self._training_rng: Optional[dict] = None
        self.model: Optional[PreTrainedModel] = None
        self.plan: Optional[ChopPlan] = None
        if chop is not None:
            chop.n_to_remove(num_layers(self.source_config()))  # reject a bad target before any weights load
        self.pruning = pruning
        if pruning is not None:
            pruning.check(self.source_config())
        if kernels != "torch":
            check_kernels(kernels, self.source_config())
        check_sdpa_backend(sdpa_backend, attn_implementation)
        check_residual_dtype(residual_dtype)  # the trainer's precision: in setup

    @property
    def source(self) -> str:
        return self.name or f"random-init {self.config_overrides['model_type']}"

    def source_config(self) -> Any:
        """The source model's config, without loading weights."""
        if self.name is None:
            return AutoConfig.for_model(**self.config_overrides)
        config = load_config(self.name)
        for key, value in (self.config_overrides or {}).items():
            setattr(config, key, value)
        return config

    def load_source(self) -> PreTrainedModel:
        return load_model(self.name, self.config_overrides, self.dtype_name, self.attn)

    # -- model ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        resume = read_checkpoint_meta(self.resume_checkpoint) if self.resume_checkpoint else None
        if resume is not None:
            # The architecture comes from the checkpoint (already chopped); its weights are loaded by Lightning next.
            cfg = AutoConfig.for_model(**resume["config"])
            self.model = from_config(cfg, dtype=DTYPES[self.dtype_name], attn_implementation=self.attn)
            self.plan = ChopPlan(**resume["plan"]) if resume.get("plan") else None
        else:
            data = self._trainer.datamodule if self._trainer is not None else None
            student = build_student(self.load_source, self.chop_spec, self.pruning, data)
            self.model, self.plan, self.pruning_report = student.model, student.plan, student.report
        self.model.config.use_cache = False
        # After pruning (its statistics are gathered through plain modules). Under `compile`, Inductor fuses norms,
        # rotary and SwiGLU itself and cannot trace liger's Triton versions (measured slower than either alone): only
        # liger's fused cross-entropy is kept then.
        self.module_kernels = "torch" if self.compile_forward else self.kernels
        apply_kernels(self.model, self.module_kernels)
        if self.residual_dtype == "bfloat16":
            residual_in_bf16(self.model)
        self.model_size = ModelSize.of(self.model)
        self.model.train()  # from_pretrained leaves it in eval mode
        if self.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The body (all but the LM head) runs compiled; kept outside the module tree so state_dict keys stay the HF ones.
        body = self.model.base_model
        self.__dict__["_body"] = torch.compile(body) if self.compile_forward else body
        self.__dict__["_head"] = output_head(self.model)
        self._prepare_for_strategy()

    def _prepare_for_strategy(self) -> None:
        """Note which parameters are matrices (weight decay) before a strategy flattens them; under FSDP, keep the
        original parameters visible (``use_orig_params``), so that the optimizer and its checkpointed state are keyed
        by parameter and the decay groups hold."""
        from lightning.pytorch.strategies import FSDPStrategy

        self._matrices = {name for name, p in self.named_parameters() if p.ndim >= 2}
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.kwargs.setdefault("use_orig_params", True)

    def setup(self, stage: str) -> None:
        check_device(self.kernels, self.trainer.strategy.root_device, first_sdpa=self.sdpa_backend)
        check_residual_dtype(self.residual_dtype, self.trainer.precision)
        self.check_data(self.trainer.datamodule)

    def check_data(self, datamodule: Any) -> None:
        """Refuse, before any weights load, training blocks longer than the model's positions, and a chop or pruning
        that needs calibration text from data that has none."""
        if not isinstance(datamodule, CalibrationData):
            if self.pruning is not None and self.pruning.calibration_samples:
                raise ValueError(refusal("model.pruning", self.pruning.method, datamodule))
            if self.chop_spec is not None and self.chop_spec.needs_calibration:
                raise ValueError(refusal("model.chop.strategy", self.chop_spec.strategy, datamodule))
        seq = getattr(datamodule, "hparams", {}).get("seq_len")
        limit = getattr(self.source_config().get_text_config(), "max_position_embeddings", None)
        if seq and limit and seq > limit:
            raise ValueError(f"data.seq_len: {seq} is longer than the model's max_position_embeddings ({limit}, "
                             f"{self.source}); lower data.seq_len to at most {limit}")

    # -- steps ------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after the last norm), which the LM head turns into logits."""
        with sdpa_backend(self.sdpa_backend):
            return self._body(input_ids=input_ids, use_cache=False).last_hidden_state

    # -- compute accounting -----------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (each module says what its step computes)."""
        raise NotImplementedError

    @property
    def flops_per_batch(self) -> Optional[float]:
        """Read by ThroughputMonitor for MFU: FLOPs of one training batch on one device."""
        return getattr(self, "_flops_per_batch", None)

    def on_train_start(self) -> None:
        # Unstructured and n:m pruning: the removed weights stay removed through recovery. They are the exact zeros of
        # the decoder linears when training starts (a resumed run finds the same), each rank's own shard under FSDP.
        self._pruned: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.pruning is not None and self.pruning.mode != "structured":
            from chop.pruning.structures import linears

            self._pruned = [(layer.weight, layer.weight == 0) for layer in linears(self.model).values()]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # right after the update, before any checkpoint of this step is written
            for weight, removed in getattr(self, "_pruned", []):
                weight.masked_fill_(removed, 0.0)

    def configure_callbacks(self) -> list:
        return [ComputeAccounting()]  # tokens, FLOPs and device-hours, checkpointed with the run

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._training_rng is not None:
            set_rng_states(self._training_rng)
        ids = batch["input_ids"][:, :-1]
        if getattr(self, "_batch_shape", None) != ids.shape:
            self._batch_shape = ids.shape
            self._flops_per_batch = self.flops_per_token(ids.shape[1]) * ids.numel()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        # The random state after this step's forward: the next step starts from it (checkpoints save it, and
        # on_train_batch_start sets it again), so a resumed run draws what an uninterrupted one draws.
        self._training_rng = rng_state()

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        # Lightning refuses to clip for a fused AdamW under any AMP plugin; only fp16 (a GradScaler) needs that.
        # Under FSDP the norm must be taken over all shards: the root FSDP module's clip_grad_norm_ does that.
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None \
                and gradient_clip_algorithm in (None, "norm"):
            root = self.trainer.model
            if hasattr(root, "clip_grad_norm_"):
                root.clip_grad_norm_(gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Skip an update whose gradients are not finite on any rank; stop after ``max_nonfinite_steps`` in a row."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
            self._nonfinite_steps = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer skips parameters without a gradient: no update this step
        self._nonfinite_steps += 1
        log.warning("step %d: loss or gradients not finite; update skipped (%d in a row)", self.global_step,
                    self._nonfinite_steps)
        if self._nonfinite_steps >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"training stopped at step {self.global_step}: the loss or gradients were not finite for "
                f"{self._nonfinite_steps} steps in a row (model.max_nonfinite_steps). The weights were not updated by "
                f"those steps, so the last checkpoint holds the last good ones. Usually model.optim.lr is too high "
                f"(it is {self.optim_cfg.lr}): lower it, or resume from an earlier checkpoint with --ckpt_path")

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        budgets = [cb.max_steps(self.trainer, self) for cb in self.trainer.callbacks if isinstance(cb, ComputeBudget)]
        if budgets and min(budgets) < total:
            total = self.trainer.fit_loop.epoch_loop.max_steps = min(budgets)
            log.info("compute budget: training stops after %d steps", total)
        if not math.isfinite(total):
            raise ValueError("trainer.max_steps: set it (or a ComputeBudget callback); the learning-rate schedule "
                             "and an endless stream need a length")
        # Every trainable parameter (a frozen teacher has none); decay on the matrices noted before any sharding.
        return optim.build(self, self.optim_cfg, int(total), getattr(self, "_matrices", None))

    # -- checkpoints and export -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {
            "source": self.source,
            "tokenizer": self.tokenizer_name,
            "config": self.model.config.to_dict(),
            "plan": self.plan.to_dict() if self.plan else None,
            "settings": self.settings(),
            "rng": rng_states_of_every_rank(self._training_rng),  # per rank, as the next step will start
        }

    def settings(self) -> dict:
        """What makes this run's model, as plain data: a resume must agree on all of it (``check_resume``)."""
        return {"model.config": self.config_overrides,
                "model.chop": dataclasses.asdict(self.chop_spec) if self.chop_spec else None,
                "model.pruning": dataclasses.asdict(self.pruning) if self.pruning else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CKPT_KEY, {})
        if "config" in meta and self.model is not None:
            differ = config_differences(meta["config"], self.model.config.to_dict())
            if differ:
                raise ValueError(f"--ckpt_path: the checkpoint's model differs from this run's in {differ}; resume "
                                 f"through `chop fit --ckpt_path` (it builds the model from the checkpoint), or set "
                                 f"model.resume_checkpoint before fit")
        states = meta.get("rng") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if len(states) == (self.trainer.world_size if self._trainer is not None else 1):
            self._training_rng = states[rank]
        elif states:
            log.warning("checkpoint has random states of %d ranks, this run has %d: dropout differs from an "
                        "uninterrupted run", len(states), self.trainer.world_size)

    def on_fit_start(self) -> None:
        out = self.output_dir()
        if out is not None and self.plan is not None and self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            (out / "chop_plan.json").write_text(json.dumps({"source": self.source, **self.plan.to_dict()}, indent=2))
        if self.plan is not None and self.logger is not None:
            self.logger.log_hyperparams({"chop/kept_layers": str(self.plan.kept), "chop/params_after": self.plan.params_after})

    def on_fit_end(self) -> None:
        out = self.output_dir()
        if not self.export_on_end or out is None:
            return
        state = self.trainer.strategy.lightning_module_state_dict()  # on every rank: FSDP gathers the shards
        if self.trainer.is_global_zero:
            weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            target = out / "hf"
            if target.exists() and any(target.iterdir()):  # a resumed run: keep the earlier export too
                target = out / f"hf-step={self.global_step}"
            export_hf(self.model, self.tokenizer_name, target, weights)
            self.export_extras(target, state)

    def export_extras(self, target: Path, state: dict[str, torch.Tensor]) -> None:
        """What a subclass trains beside the model (``state``: the whole gathered state dict), written into the
        export ``target`` beside the Hugging Face files."""

    def output_dir(self) -> Optional[Path]:
        cb = self.trainer.checkpoint_callback
        return Path(cb.dirpath) if cb is not None and cb.dirpath else None


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA random states, as plain data (``weights_only`` loads it)."""
    from lightning.fabric.utilities.seed import _collect_rng_states

    state = _collect_rng_states()
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)}


def rng_states_of_every_rank(mine: Optional[dict] = None) -> list[dict]:
    """``mine`` (default: the current random state) of every rank, in rank order (all ranks must call this)."""
    mine = mine or rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    every: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def set_rng_states(state: dict) -> None:
    from lightning.fabric.utilities.seed import _set_rng_states

    kind, keys, pos, has_gauss, gauss = state["numpy"]
    _set_rng_states({**state, "numpy": (kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss)})
