"""``python -m chop fit|validate|test``: LightningCLI over chop's modules, refusing a checkpoint that is not this run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning import LightningDataModule
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI

from chop.training.callbacks import AtomicCheckpointIO
from chop.training.pretrain import ContinuedPretraining, read_checkpoint_meta


def _tokenizer(tokenizer: Optional[str], name: Optional[str]) -> Optional[str]:
    return tokenizer or name


class ChopCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        # The tokenizer is written once, in the model section, and reaches the data section from there.
        parser.link_arguments(("model.init_args.tokenizer", "model.init_args.name"), "data.init_args.tokenizer",
                              compute_fn=_tokenizer)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        check_resume(self.trainer, self.model, self.config_init[self.subcommand].get("ckpt_path"))


def check_resume(trainer: Any, model: ContinuedPretraining, ckpt_path: Optional[str]) -> None:
    """Refuse, before anything is written, a checkpoint that is corrupt or belongs to another model or chop."""
    if not ckpt_path:
        return
    if ckpt_path == "last":
        cb = trainer.checkpoint_callback
        if cb is None:
            return
        # Before fit, ModelCheckpoint's folder is only known from the logger (Lightning's default layout).
        folder = Path(cb.dirpath) if cb.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        last = folder / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        if not last.exists():
            return  # Lightning warns and starts afresh
        ckpt_path = str(last)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"--ckpt_path: '{ckpt_path}' does not exist")
    meta = read_checkpoint_meta(ckpt_path)
    if meta["source"] != model.source:
        raise ValueError(f"--ckpt_path: '{ckpt_path}' was trained from '{meta['source']}', but model.name is "
                         f"'{model.source}'; resume with the config that made it, or start a new run")
    saved, now = meta["plan"], model.chop_spec
    if (saved is None) != (now is None) or (saved is not None and saved["strategy"] != now.strategy):
        raise ValueError(f"--ckpt_path: '{ckpt_path}' was chopped by {saved and saved['strategy']}, but model.chop "
                         f"is {now}; resume with the config that made it")
    teacher = getattr(model, "teacher_source", None)
    if meta.get("teacher") != teacher:
        raise ValueError(f"--ckpt_path: '{ckpt_path}' was trained with teacher {meta.get('teacher')!r}, but this run's "
                         f"is {teacher!r}; resume with the config that made it")


def cli_main(args: Optional[list[str]] = None) -> ChopCLI:
    return ChopCLI(
        ContinuedPretraining,
        LightningDataModule,  # StreamingDataModule for pretraining, ClassificationDataModule for prompt fine-tuning
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
