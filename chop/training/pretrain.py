"""Continued pretraining of a (chopped) causal LM: the LightningModule that every chop recipe trains.

Other training modules (distillation, classification) subclass it and override ``training_loss``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from chop.models.loading import DTYPES, load_config, load_model
from chop.models.registry import num_layers
from chop.pruning.layerchop import ChopPlan, LayerChop, chop
from chop.training import optim
from chop.training.flops import train_flops_per_token

log = logging.getLogger(__name__)

CKPT_KEY = "chop"  # what chop adds to a Lightning checkpoint: the trained model's HF config, source and plan


class ContinuedPretraining(L.LightningModule):
    """Loads ``name`` (hub id or directory) or a random-init ``config``, chops it, trains all weights on the LM loss.

    Args:
        name: hub id or local directory of the source model.
        tokenizer: tokenizer id/directory when it differs from ``name`` (e.g. a random-init ``config``).
        config: a config dict with ``model_type`` for a random-init model, or overrides of ``name``'s config.
        dtype: parameter dtype (``float32`` with ``bf16-mixed`` precision on GPU is the usual choice).
        attn_implementation: ``sdpa``, ``flash_attention_2`` or ``eager``.
        chop: which layers to delete before training (None: train the model as it is).
        optim: optimizer and learning-rate schedule.
        compile: run the forward through ``torch.compile``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        export_on_end: at the end of ``fit``, write the model and tokenizer as a Hugging Face directory
            ``hf/`` beside the checkpoints.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        tokenizer: Optional[str] = None,
        config: Optional[dict] = None,
        dtype: str = "float32",
        attn_implementation: Optional[str] = "sdpa",
        chop: Optional[LayerChop] = None,
        optim: optim.Optim = optim.Optim(),
        compile: bool = False,
        gradient_checkpointing: bool = False,
        export_on_end: bool = True,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype: '{dtype}' is not one of {list(DTYPES)}")
        if name is None and not (config and "model_type" in config):
            raise ValueError("model.name: give a hub id or directory, or model.config with a model_type for random init")
        self.save_hyperparameters()
        # LightningCLI stores its config (plain dicts) as hparams: keep the typed arguments themselves too.
        self.name, self.config_overrides, self.dtype_name, self.attn = name, config, dtype, attn_implementation
        self.chop_spec, self.optim_cfg, self.tokenizer_name = chop, optim, tokenizer or name
        self.compile_forward, self.gradient_checkpointing, self.export_on_end = compile, gradient_checkpointing, export_on_end
        self.model: Optional[PreTrainedModel] = None
        self.plan: Optional[ChopPlan] = None
        self.tokens_seen = 0
        self.val_loss = MeanMetric()
        if chop is not None and name is not None:
            chop.n_to_remove(num_layers(load_config(name)))  # reject a bad target before any weights load

    @property
    def source(self) -> str:
        return self.name or f"random-init {self.config_overrides['model_type']}"

    # -- model ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        resume = self._checkpoint_meta()
        if resume is not None:
            # The architecture comes from the checkpoint (already chopped); its weights are loaded by Lightning next.
            cfg = AutoConfig.for_model(**resume["config"])
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[self.dtype_name], attn_implementation=self.attn)
            self.plan = ChopPlan(**resume["plan"]) if resume.get("plan") else None
        else:
            self.model = load_model(self.name, self.config_overrides, self.dtype_name, self.attn)
            spec = self.chop_spec
            if spec is not None:
                calib = None
                if spec.strategy == "block_influence":
                    calib = self.trainer.datamodule.calibration_batches(spec.calibration_batches)
                self.plan = chop(self.model, spec, calib)
                log.info("chop plan: kept %s; parameters %d -> %d", self.plan.kept, self.plan.params_before, self.plan.params_after)
        self.model.config.use_cache = False
        self.model.train()  # from_pretrained leaves it in eval mode
        if self.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Compiled forward kept outside the module tree so that state_dict keys stay those of the HF model.
        self.__dict__["_forward"] = torch.compile(self.model) if self.compile_forward else self.model

    def _checkpoint_meta(self) -> Optional[dict]:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if not path:
            return None
        return read_checkpoint_meta(path)

    # -- steps ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids=input_ids, use_cache=False).logits

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one batch; ``loss`` is optimised, every entry is logged as ``train/<key>``."""
        return {"loss": self.lm_loss(self(inputs), targets)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        losses = self.training_loss(ids[:, :-1], ids[:, 1:])
        self.tokens_seen += ids[:, :-1].numel() * self.trainer.world_size
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True)
        self.log("train/tokens_seen", float(self.tokens_seen))
        return losses["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        loss = self.lm_loss(self(ids[:, :-1]), ids[:, 1:])
        self.val_loss.update(loss, weight=ids[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            # Lightning drops logs of the sanity check; a sanity pass over the whole validation set is the step-0 baseline.
            full = sum(self.trainer.num_sanity_val_batches) == sum(self.trainer.num_val_batches)
            if full and self.global_step == 0 and self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics({"val/loss": loss.item(), "val/ppl": math.exp(loss.item())}, step=0)
            return
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    @property
    def flops_per_batch(self) -> Optional[float]:
        """Read by ThroughputMonitor for MFU: FLOPs of one training batch on one device."""
        return getattr(self, "_flops_per_batch", None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.flops_per_batch is None:
            ids = batch["input_ids"][:, :-1]
            self._flops_per_batch = train_flops_per_token(self.model, ids.shape[1]) * ids.numel()

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        # Lightning refuses to clip for a fused AdamW under any AMP plugin; only fp16 (a GradScaler) needs that.
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None \
                and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("trainer.max_steps: set it; the learning-rate schedule (and an endless stream) need a length")
        return optim.build(self.model, self.optim_cfg, int(total))

    # -- checkpoints and export -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {
            "source": self.source,
            "tokenizer": self.tokenizer_name,
            "config": self.model.config.to_dict(),
            "plan": self.plan.to_dict() if self.plan else None,
            "tokens_seen": self.tokens_seen,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get(CKPT_KEY, {}).get("tokens_seen", 0)

    def on_fit_start(self) -> None:
        out = self.output_dir()
        if out is not None and self.plan is not None and self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            (out / "chop_plan.json").write_text(json.dumps({"source": self.source, **self.plan.to_dict()}, indent=2))
        if self.plan is not None and self.logger is not None:
            self.logger.log_hyperparams({"chop/kept_layers": str(self.plan.kept), "chop/params_after": self.plan.params_after})

    def on_fit_end(self) -> None:
        out = self.output_dir()
        if self.export_on_end and out is not None and self.trainer.is_global_zero:
            export_hf(self.model, self.tokenizer_name, out / "hf")

    def output_dir(self) -> Optional[Path]:
        cb = self.trainer.checkpoint_callback
        return Path(cb.dirpath) if cb is not None and cb.dirpath else None


def read_checkpoint_meta(path: str) -> dict:
    """chop's part of a Lightning checkpoint, or a clear error when the file is not a readable chop checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"--ckpt_path: '{path}' is not a readable checkpoint ({type(err).__name__}: {err}); "
                         f"it may be truncated or corrupt: pick another one, e.g. an earlier step's") from err
    if CKPT_KEY not in ckpt:
        raise ValueError(f"--ckpt_path: '{path}' is not a chop checkpoint (no '{CKPT_KEY}' entry)")
    meta = dict(ckpt[CKPT_KEY])
    meta["hyper_parameters"] = ckpt.get("hyper_parameters", {})
    return meta


def export_hf(model: PreTrainedModel, tokenizer: Optional[str], out: Path) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face directory, never over an existing non-empty one."""
    from chop.models.loading import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export: '{out}' exists and is not empty; choose another --out or remove it")
    config = model.config
    was_cache = config.use_cache
    config.use_cache = True
    try:
        model.save_pretrained(out)
    finally:
        config.use_cache = was_cache
    if tokenizer:
        load_tokenizer(tokenizer).save_pretrained(out)
    return out
