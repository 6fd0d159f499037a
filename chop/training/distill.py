"""Distillation: a frozen teacher (by default the unpruned source model) teaches a chopped or pruned student.

The compared alternative to continued pretraining in Just CHOP. Losses (any subset, each with a weight): the LM
cross-entropy, a divergence between the two models' next-token distributions (computed in chunks of tokens),
MSE between student layers and their teacher layers (L_hid), and between the embeddings (L_emb). Attention-map
losses are left out: fused attention kernels (SDPA, FlashAttention) never form the attention matrix.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from chop.models.kernels import apply_kernels, sdpa_backend
from chop.models.loading import DTYPES, load_config, load_model, load_tokenizer
from chop.models.registry import decoder_layers, num_layers, output_head
from chop.training.flops import ModelSize
from chop.training.losses import DIVERGENCES, LogitLoss
from chop.models.checkpoint import CKPT_KEY
from chop.training.pretrain import ContinuedPretraining

log = logging.getLogger(__name__)


@dataclass
class DistillLoss:
    """Weights of the losses (0 turns one off) and their settings.

    Args:
        lm: LM cross-entropy on the data.
        logits: divergence between teacher and student next-token distributions.
        divergence: ``forward_kl`` (KL(teacher||student)), ``reverse_kl`` or ``jsd``.
        temperature: softens both distributions; the divergence is scaled by T².
        hidden: MSE between each student layer's output and its teacher layer's (L_hid), averaged over layers.
        embedding: MSE between the token embeddings (L_emb).
        layer_map: the teacher layer of each student layer; default: each kept layer's original index (the chop
            plan), or layer i to layer i when nothing was chopped.
    """

    lm: float = 1.0
    logits: float = 1.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    hidden: float = 0.0
    embedding: float = 0.0
    layer_map: Optional[list[int]] = None

    def __post_init__(self) -> None:
        weights = {"lm": self.lm, "logits": self.logits, "hidden": self.hidden, "embedding": self.embedding}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"model.loss: weights must be >= 0, got {weights}")
        if not (self.logits or self.hidden or self.embedding):
            raise ValueError("model.loss: logits, hidden and embedding are all 0, so the teacher would teach nothing; "
                             "give one a weight, or train with chop.ContinuedPretraining")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"model.loss.divergence: '{self.divergence}' is not one of {list(DIVERGENCES)}")
        if self.temperature <= 0:
            raise ValueError(f"model.loss.temperature: {self.temperature} must be > 0")


class Distillation(ContinuedPretraining):
    """Trains the student as ``ContinuedPretraining`` does (same arguments, optimizer, schedule, data, logging) on
    the losses of ``loss``, against a frozen ``teacher``.

    Args:
        teacher: hub id or directory of the teacher; default: the source model itself (``name``/``config``),
            loaded once and copied before the chop.
        teacher_dtype: the teacher's parameter dtype; default bfloat16 on GPU, float32 on CPU.
        loss: the losses and their weights.

    The teacher is in eval mode with no gradients, outside the optimizer and the checkpoints (on resume it is
    loaded again from its source), on the student's devices; under FSDP the strategy shards its layers too.
    """

    def __init__(self, *args: Any, teacher: Optional[str] = None, teacher_dtype: Optional[str] = None,
                 loss: DistillLoss = DistillLoss(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loss = DistillLoss(**loss) if isinstance(loss, dict) else loss
        if teacher_dtype is not None and teacher_dtype not in DTYPES:
            raise ValueError(f"model.teacher_dtype: '{teacher_dtype}' is not one of {list(DTYPES)}")
        self.teacher_name, self.teacher_dtype, self.loss_cfg = teacher, teacher_dtype, loss
        self.teacher: Optional[PreTrainedModel] = None
        self.hidden_proj: Optional[nn.Linear] = None
        self.embedding_proj: Optional[nn.Linear] = None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        self._capturing = False
        # Drop the teacher from every state_dict (checkpoints) and do not expect it back when loading one.
        self.register_state_dict_post_hook(_drop_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_missing)
        self.vocab = self._check_teacher()

    @property
    def teacher_source(self) -> str:
        return self.teacher_name or self.source

    # -- checks before any weights load ---------------------------------------------------------------------------
    def _check_teacher(self) -> Optional[int]:
        """Refuse a teacher with another vocabulary or a bad layer map; the vocabulary size both share, if it differs."""
        student = self.source_config()
        teacher = student if self.teacher_name is None else load_config(self.teacher_name)
        s_vocab, t_vocab = student.get_text_config().vocab_size, teacher.get_text_config().vocab_size
        shared = None
        if self.teacher_name is not None:
            s_tok = load_tokenizer(self.tokenizer_name).get_vocab() if self.tokenizer_name else None
            t_tok = load_tokenizer(self.teacher_name).get_vocab()
            if s_tok is not None and s_tok != t_tok:
                only_s = sorted(set(s_tok.items()) - set(t_tok.items()), key=lambda kv: kv[1])
                raise ValueError(
                    f"model.teacher: '{self.teacher_name}' has another tokenizer than the student "
                    f"('{self.tokenizer_name}'): {len(s_tok)} vs {len(t_tok)} tokens, {len(only_s)} of the student's "
                    f"differ (e.g. {only_s[:3]}). Distillation compares next-token distributions over one vocabulary: "
                    f"choose a teacher with the student's tokenizer")
            if s_vocab != t_vocab:
                shared = len(t_tok)
                if shared > min(s_vocab, t_vocab):
                    raise ValueError(f"model.teacher: vocab_size {t_vocab} (teacher) and {s_vocab} (student) cannot "
                                     f"both cover the tokenizer's {shared} tokens")
        elif s_vocab != t_vocab:
            raise ValueError(f"model.teacher: vocab_size {t_vocab} differs from the student's {s_vocab}")
        cfg = self.loss_cfg
        if cfg.hidden:
            n_student = num_layers(student) - (self.chop_spec.n_to_remove(num_layers(student)) if self.chop_spec else 0)
            n_teacher = num_layers(teacher)
            if cfg.layer_map is not None:
                if len(cfg.layer_map) != n_student or not all(0 <= t < n_teacher for t in cfg.layer_map):
                    raise ValueError(f"model.loss.layer_map: give one teacher layer in [0, {n_teacher}) for each of the "
                                     f"student's {n_student} layers; got {cfg.layer_map}")
            elif self.chop_spec is None and n_student != n_teacher:
                raise ValueError(f"model.loss.layer_map: the student has {n_student} layers and the teacher {n_teacher}, "
                                 f"and no chop plan maps one to the other: give layer_map")
        return shared

    # -- models ---------------------------------------------------------------------------------------------------
    def _teacher_dtype(self) -> str:
        if self.teacher_dtype is not None:
            return self.teacher_dtype
        on_gpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return "bfloat16" if on_gpu else "float32"

    def load_source(self) -> PreTrainedModel:
        source = super().load_source()
        if self.teacher_name is None:  # the teacher is the source itself: copy it before the chop, not load it again
            # Held aside until the student is registered: the student's parameters come first in the module tree in
            # a new run and in a resumed one alike (FSDP keys a full optimizer state by that order).
            self.__dict__["_source_copy"] = frozen_copy(source, DTYPES[self._teacher_dtype()])
        return source

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        teacher = self.__dict__.pop("_source_copy", None)
        if teacher is None and self.teacher_name is None:  # a resumed run: the checkpoint holds no teacher
            # The source again, loaded and copied as a new run does (a random init drawn in bfloat16 would differ).
            teacher = frozen_copy(super().load_source(), DTYPES[self._teacher_dtype()])
        elif teacher is None:
            teacher = load_model(self.teacher_name, None, self._teacher_dtype(), self.attn)
        self.teacher = teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher.config.use_cache = False
        apply_kernels(self.teacher, self.module_kernels)
        self.teacher_size = ModelSize.of(self.teacher)
        self._bind_teacher()
        self._hook_layers()
        self._fsdp_units()
        self._prepare_for_strategy()  # again: the projections are new parameters

    def _fsdp_units(self) -> None:
        """Under FSDP, the wrap policy that shards both models: every decoder layer of each is a unit; the bf16
        teacher's body (embeddings, final norm) and head are units of their own, apart from the fp32 student's weights
        in the root unit (a unit holds one dtype). The loss calls the teacher's body and head directly, so each must
        be its own unit; a head tied to the embeddings cannot be, and then the teacher's embeddings, norm and head are
        one unit replicated on every rank (``NO_SHARD``), its layers still sharded."""
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

        strategy = self.trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDPStrategy):
            return
        policy = strategy.kwargs.get("auto_wrap_policy")
        if policy is not None and not isinstance(policy, ModuleWrapPolicy):
            raise ValueError("trainer.strategy.init_args.auto_wrap_policy: with a teacher, give it as a list of layer "
                             "classes (chop adds both models' decoder layers and the teacher's body and head)")
        layers = {type(m) for net in (self.model, self.teacher) for m in decoder_layers(net)}
        layers |= set(policy._module_classes) if policy is not None else set()
        teacher, body, head = self.teacher, self.teacher.base_model, self.teacher.get_output_embeddings()
        tied = any(p is q for p in head.parameters() for q in body.parameters())

        def unit(module: nn.Module) -> Any:
            if module is teacher and tied:
                return {"sharding_strategy": ShardingStrategy.NO_SHARD}
            return type(module) in layers or (not tied and (module is body or module is head))

        strategy.kwargs["auto_wrap_policy"] = CustomPolicy(unit)

    def _hook_layers(self) -> None:
        """Forward hooks that keep the outputs the hidden-state and embedding losses compare."""
        cfg = self.loss_cfg
        s_dim = self.model.config.get_text_config().hidden_size
        t_dim = self.teacher.config.get_text_config().hidden_size
        if cfg.hidden:
            self.layer_map = cfg.layer_map or (self.plan.kept if self.plan else list(range(num_layers(self.model.config))))
            for j, layer in enumerate(decoder_layers(self.model)):
                layer.register_forward_hook(self._capture("student", j))
            t_layers = decoder_layers(self.teacher)
            for t in set(self.layer_map):
                t_layers[t].register_forward_hook(self._capture("teacher", t))
            if s_dim != t_dim:
                self.hidden_proj = nn.Linear(s_dim, t_dim, bias=False, dtype=self.model.dtype)
        if cfg.embedding:
            self.model.get_input_embeddings().register_forward_hook(self._capture("student", -1))
            self.teacher.get_input_embeddings().register_forward_hook(self._capture("teacher", -1))
            s_emb = self.model.get_input_embeddings().embedding_dim
            t_emb = self.teacher.get_input_embeddings().embedding_dim
            if s_emb != t_emb:
                self.embedding_proj = nn.Linear(s_emb, t_emb, bias=False, dtype=self.model.dtype)

    def _capture(self, model: str, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._capturing:  # not in a gradient-checkpointing recompute, nor in validation
                self._captured[(model, index)] = output[0] if isinstance(output, tuple) else output
        return hook

    def train(self, mode: bool = True) -> "Distillation":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout in the teacher, ever
        return self

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.eval()  # a strategy's wrappers around the teacher (FSDP units) start in train mode
        self._bind_teacher()  # again: the strategy may have wrapped the body and head in FSDP units since

    def _bind_teacher(self) -> None:
        """The teacher's body and head as they are now (FSDP units, once the strategy wrapped them: each call then
        gathers their shards); kept outside the module tree."""
        body = self.teacher.base_model
        self.__dict__["_teacher_body"] = torch.compile(body) if self.compile_forward else body
        self.__dict__["_teacher_head"] = output_head(self.teacher) if self.loss_cfg.logits else None

    # -- losses ---------------------------------------------------------------------------------------------------
    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.loss_cfg
        self._capturing = bool(cfg.hidden or cfg.embedding)
        try:
            with torch.no_grad(), sdpa_backend(self.sdpa_backend):
                teacher_hidden = self._teacher_body(input_ids=inputs, use_cache=False).last_hidden_state
            hidden = self.hidden_states(inputs)
        finally:
            self._capturing = False
        logit_loss = LogitLoss(lm=cfg.lm, distill=cfg.logits, divergence=cfg.divergence,
                               temperature=cfg.temperature, vocab=self.vocab)
        out = self.logit_losses(hidden, targets, logit_loss, teacher_hidden if cfg.logits else None, self._teacher_head)
        losses = {"lm": out["lm"]}
        total = out["loss"]
        if cfg.logits:
            losses["logits"] = out["distill"]
        if cfg.hidden:
            pairs = [(self._captured[("student", j)], self._captured[("teacher", t)]) for j, t in enumerate(self.layer_map)]
            losses["hidden"] = torch.stack([_mse(s, t, self.hidden_proj) for s, t in pairs]).mean()
            total = total + cfg.hidden * losses["hidden"]
        if cfg.embedding:
            losses["embedding"] = _mse(self._captured[("student", -1)], self._captured[("teacher", -1)],
                                       self.embedding_proj)
            total = total + cfg.embedding * losses["embedding"]
        self._captured.clear()
        return {"loss": total, **losses}

    # -- compute and checkpoints ----------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """The student's forward and backward, the teacher's forward (2N + 4 L d s), and the projections'."""
        projections = sum(p.numel() for m in (self.hidden_proj, self.embedding_proj) if m is not None for p in m.parameters())
        return super().flops_per_token(seq_len) + self.teacher_size.forward_flops(seq_len) + 6 * projections

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY]["teacher"] = self.teacher_source


def frozen_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of ``model`` with its parameters in ``dtype`` and no gradients, made without a full-precision copy."""
    memo: dict[int, Any] = {}
    for p in model.parameters():  # tied parameters share an id, so they stay tied
        memo[id(p)] = nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
    return copy.deepcopy(model, memo)


def _mse(student: torch.Tensor, teacher: torch.Tensor, proj: Optional[nn.Linear]) -> torch.Tensor:
    if proj is not None:
        student = proj(student)
    return F.mse_loss(student.float(), teacher.float())


def _is_teacher(key: str) -> bool:
    return key.replace("_fsdp_wrapped_module.", "").startswith("teacher.")


def _drop_teacher(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if _is_teacher(k[len(prefix):])]:
        del state_dict[key]


def _teacher_not_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _is_teacher(k)]
