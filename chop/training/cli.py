"""``python -m chop fit|validate|test``: LightningCLI over chop's modules, refusing a checkpoint that is not this run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning import LightningDataModule
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI

from chop.models.checkpoint import load_checkpoint
from chop.training.callbacks import AtomicCheckpointIO
from chop.models.checkpoint import read_checkpoint_meta
from chop.training.module import CausalLMModule


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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path file's hyperparameters first: refuse one that needs code, or is corrupt, here.
        ckpt = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt and Path(ckpt).is_file():
            load_checkpoint(ckpt)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        # Everything here runs before the config, a checkpoint or a log is written.
        self.model.check_data(self.datamodule)
        ckpt = check_resume(self.trainer, self.model, self.config_init[self.subcommand].get("ckpt_path"))
        self.model.resume_checkpoint = ckpt


def checkpoint_folder(trainer: Any) -> Optional[Path]:
    """Where ModelCheckpoint will write; before fit it is only known from the logger (Lightning's default layout)."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return Path(cb.dirpath) if cb.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


def check_resume(trainer: Any, model: CausalLMModule, ckpt_path: Optional[str]) -> Optional[str]:
    """The checkpoint to resume from, or None for a new run; refuses, before anything is written, a corrupt checkpoint,
    one whose model, chop or pruning differ from the config, and a new run into a folder that holds checkpoints."""
    folder = checkpoint_folder(trainer)
    if not ckpt_path:
        earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
        if earlier:
            raise FileExistsError(
                f"trainer: the run folder '{folder}' already holds checkpoints ({', '.join(earlier[:3])}); a new run "
                f"there would overwrite its config and mix their logs. Resume it with --ckpt_path last, or start a new "
                f"run elsewhere (another trainer.logger.init_args.version or name)")
        return None
    if ckpt_path == "last":
        if folder is None:
            return None
        last = folder / f"{trainer.checkpoint_callback.CHECKPOINT_NAME_LAST}{trainer.checkpoint_callback.FILE_EXTENSION}"
        if not last.exists():
            return None  # Lightning warns and starts afresh
        ckpt_path = str(last)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"--ckpt_path: '{ckpt_path}' does not exist")
    meta = read_checkpoint_meta(ckpt_path)
    if meta["source"] != model.source:
        raise ValueError(f"--ckpt_path: '{ckpt_path}' was trained from '{meta['source']}', but model.name is "
                         f"'{model.source}'; resume with the config that made it, or start a new run")
    saved = meta.get("settings")
    if saved is None:  # checkpoints of chop before settings were recorded: compare the chop strategy alone
        plan, now = meta["plan"], model.chop_spec
        if (plan is None) != (now is None) or (plan is not None and plan["strategy"] != now.strategy):
            raise ValueError(f"--ckpt_path: '{ckpt_path}' was chopped by {plan and plan['strategy']}, but model.chop "
                             f"is {now}; resume with the config that made it")
    else:
        differ = [f"{k}: checkpoint {saved[k]!r}, config {v!r}" for k, v in model.settings().items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"--ckpt_path: '{ckpt_path}' was made with other settings than this config "
                             f"({'; '.join(differ)}); resume with the config that made it, or start a new run")
    teacher = getattr(model, "teacher_source", None)
    if meta.get("teacher") != teacher:
        raise ValueError(f"--ckpt_path: '{ckpt_path}' was trained with teacher {meta.get('teacher')!r}, but this run's "
                         f"is {teacher!r}; resume with the config that made it")
    return ckpt_path


def cli_main(args: Optional[list[str]] = None) -> ChopCLI:
    return ChopCLI(
        CausalLMModule,  # ContinuedPretraining, Distillation or PromptClassification
        LightningDataModule,  # StreamingDataModule for pretraining, ClassificationDataModule for prompt fine-tuning
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
