"""Prompt-based fine-tuning of a (chopped) causal LM for text classification ("Why Lift so Heavy?", arXiv 2402.11700).

The model reads ``template(text)`` and each class is scored by the log-probability of its verbalizer word as the
continuation (a word of several tokens: the sum over its tokens); the loss is the cross-entropy over the label set.
``head: linear`` is the standard alternative the paper compares: a linear layer on the prompt's last hidden state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from chop.training.module import CausalLMModule

HEADS = ("verbalizer", "linear")


def verbalizer_scores(body: Callable[[torch.Tensor], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                      input_ids: torch.Tensor, lengths: torch.Tensor, words: Sequence[Sequence[int]]) -> torch.Tensor:
    """(batch, classes) summed log-probabilities of each class's word tokens after each (right-padded) prompt.

    ``body`` maps input ids to final hidden states and ``head`` hidden states to logits. Words of one token are
    read from one forward of the prompts; longer words feed the prompt plus the word's tokens but its last.
    """
    batch, n_classes = input_ids.shape[0], len(words)
    longest = max(len(w) for w in words)
    if longest == 1:
        last = body(input_ids)[torch.arange(batch), lengths - 1]
        logp = F.log_softmax(head(last).float(), dim=-1)
        return logp[:, [w[0] for w in words]]
    rows = torch.zeros(batch * n_classes, input_ids.shape[1] + longest - 1, dtype=input_ids.dtype,
                       device=input_ids.device)
    row_b = torch.arange(batch, device=input_ids.device).repeat_interleave(n_classes)
    rows[:, :input_ids.shape[1]] = input_ids[row_b]
    pos, target, owner = [], [], []
    for r in range(batch * n_classes):
        c, n = r % n_classes, int(lengths[r // n_classes])
        w = list(words[c])
        rows[r, n:n + len(w) - 1] = torch.tensor(w[:-1], dtype=rows.dtype)
        pos += [r * rows.shape[1] + n - 1 + j for j in range(len(w))]
        target += w
        owner += [r] * len(w)
    hidden = body(rows).flatten(0, 1)[torch.tensor(pos, device=rows.device)]
    logp = F.log_softmax(head(hidden).float(), dim=-1)
    picked = logp.gather(1, torch.tensor(target, device=rows.device)[:, None])[:, 0]
    scores = torch.zeros(batch * n_classes, device=rows.device).index_add(0, torch.tensor(owner, device=rows.device),
                                                                           picked)
    return scores.view(batch, n_classes)


class PromptClassification(CausalLMModule):
    """Fine-tunes all weights of a (chopped) causal LM to classify text by prompting.

    Takes every argument of ``CausalLMModule`` (model, chop, pruning, optimizer), plus:

    Args:
        head: ``verbalizer`` (the LM's own next-word probabilities of the data's verbalizer words) or ``linear``
            (a new linear layer on the prompt's last hidden state).

    The template and verbalizer live in the data section (``ClassificationDataModule``). Logs ``train/loss``,
    ``train/acc``, ``val/acc``, ``val/f1`` (macro) and, under ``python -m chop test``, ``test/acc`` and ``test/f1``.
    """

    def __init__(self, *args: Any, head: str = "verbalizer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if head not in HEADS:
            raise ValueError(f"model.head: '{head}' is not one of {list(HEADS)}")
        self.head_kind = head
        self.classifier: nn.Linear | None = None
        self.metrics: nn.ModuleDict | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.metrics is not None:
            return
        data = self.trainer.datamodule
        data.setup()
        self.words = data.word_ids
        n = len(self.words)
        if self.head_kind == "linear":
            hidden = self.model.config.get_text_config().hidden_size
            self.classifier = nn.Linear(hidden, n, dtype=self.model.dtype)
        self.metrics = nn.ModuleDict({f"{stage}_{name}": metric for stage in ("val", "test") for name, metric in
                                      (("acc", MulticlassAccuracy(n, average="micro")),
                                       ("f1", MulticlassF1Score(n, average="macro")))})

    def class_scores(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, classes) logits over the label set."""
        if self.classifier is not None:
            last = self.hidden_states(input_ids)[torch.arange(len(lengths)), lengths - 1]
            return self.classifier(last).float()
        return verbalizer_scores(self.hidden_states, self._head, input_ids, lengths, self.words)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        scores = self.class_scores(batch["input_ids"], batch["lengths"])
        loss = F.cross_entropy(scores, batch["labels"])
        predicted = scores.argmax(-1)
        if stage == "train":
            self.log_dict({"train/loss": loss.detach(), "train/acc": (predicted == batch["labels"]).float().mean()},
                          prog_bar=True)
            return loss
        for name in ("acc", "f1"):  # over the whole held-out set, as torchmetrics accumulates it across batches
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(predicted, batch["labels"])
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc")
        self.log(f"{stage}/loss", loss.detach())
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per prompt token: the body's forward and backward on every token (6N + 12 L d s, N without
        the LM head), and the head (the verbalizer's LM head, or the linear layer) on one token per prompt."""
        lm_head = self.model.get_output_embeddings().weight.numel()
        head = self.classifier.weight.numel() if self.classifier is not None else lm_head
        return self.model_size.train_flops(seq_len) - 6 * lm_head + 6 * head / seq_len

    def export_extras(self, target: Path, state: dict[str, torch.Tensor]) -> None:
        """A ``linear`` head is trained with the model: write it beside the model (``classifier.safetensors``,
        ``weight`` and ``bias``, applied to the last prompt token's final hidden state) with the class order and the
        prompt (``classifier.json``); otherwise the export would hold the body without its classifier."""
        if self.classifier is None:
            return
        from safetensors.torch import save_file

        data = self.trainer.datamodule
        save_file({k.removeprefix("classifier."): v.contiguous() for k, v in state.items() if k.startswith("classifier.")},
                  str(target / "classifier.safetensors"))
        (target / "classifier.json").write_text(json.dumps({
            "classes": data.labels, "template": data.template, "input": "final hidden state of the prompt's last token",
            "weights": "classifier.safetensors"}, indent=2))
