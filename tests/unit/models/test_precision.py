"""The residual stream's dtype (chop/models/precision.py): under bf16 autocast ``bfloat16`` makes the decoder layers
read a bf16 stream, outside autocast nothing changes, the loss stays within bf16 rounding of float32's, and a setting
it cannot honour is refused before any weights load (CPU; the speed it buys: benchmarks/train_throughput.py)."""

import lightning as L
import pytest
import torch
from helpers import TINY

from chop.training.pretrain import ContinuedPretraining


def stream_dtypes(module, ids, autocast: bool):
    """The dtype of the hidden states each decoder layer receives, and the training loss."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True) for layer in module.model.model.layers]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module.training_loss(ids[:, :-1], ids[:, 1:])["loss"]
    for h in hooks:
        h.remove()
    return set(seen), loss


@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_the_residual_stream_is_bf16_under_autocast_only_when_asked(residual):
    torch.manual_seed(0)
    module = ContinuedPretraining(config=TINY["llama"], residual_dtype=residual)
    module.configure_model()
    reference = ContinuedPretraining(config=TINY["llama"])
    reference.configure_model()
    reference.model.load_state_dict(module.model.state_dict())
    ids = torch.randint(2, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    dtypes, loss = stream_dtypes(module, ids, autocast=True)
    assert dtypes == {torch.bfloat16 if residual == "bfloat16" else torch.float32}
    _, reference_loss = stream_dtypes(reference, ids, autocast=True)
    torch.testing.assert_close(loss.float(), reference_loss.float(), rtol=2e-2, atol=0)  # other rounding, same model
    dtypes, loss = stream_dtypes(module, ids, autocast=False)  # e.g. evaluation in float32: the model as exported
    _, reference_loss = stream_dtypes(reference, ids, autocast=False)
    assert dtypes == {torch.float32} and torch.equal(loss, reference_loss)


def test_a_residual_dtype_it_cannot_honour_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"model\.residual_dtype: 'float16' is not one of \['float32', 'bfloat16'\]"):
        ContinuedPretraining(config=TINY["llama"], residual_dtype="float16")
    module = ContinuedPretraining(config=TINY["llama"], residual_dtype="bfloat16")
    loads = []
    monkeypatch.setattr(module, "load_source", lambda: loads.append(1))
    data = L.LightningDataModule.from_datasets(train_dataset=[{"input_ids": torch.zeros(9, dtype=torch.long)}])
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, precision="32-true")
    with pytest.raises(ValueError, match=r"model\.residual_dtype: 'bfloat16'.*trainer\.precision is '32-true'.*"
                                         r"trainer\.precision: bf16-mixed"):
        trainer.fit(module, data)
    assert not loads and module.model is None
