"""The pruning methods' registry (chop/pruning/registry.py) and interface (pruner.py): every entry is a dataclass whose
``method`` is its name, a config's ``method`` picks it and it accepts only its own settings, and the calibration text
is a protocol that data modules implement or are refused for."""

import dataclasses
import typing

import pytest
import torch
from helpers import TINY

from chop.models.loading import load_model
from chop.pruning.pruner import Pruner, calibration_batches
from chop.pruning.registry import PRUNERS, pruner_class, pruner_from


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_every_method_is_a_pruner_named_by_its_method_field(method):
    cls = pruner_class(method)
    assert issubclass(cls, Pruner) and dataclasses.is_dataclass(cls)
    assert typing.get_args(typing.get_type_hints(cls)["method"]) == (method,) and cls().method == method
    pruner_from({"method": method}).check(load_model(config=dict(TINY["llama"], num_hidden_layers=2)).config)


def test_a_config_picks_the_method_and_refuses_settings_it_does_not_have():
    from jsonargparse import ArgumentParser

    from chop.pruning.registry import Pruning

    def run(pruning: Pruning = None):
        return pruning

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(run)
    got = parser.instantiate(parser.parse_args(["--pruning", '{"method": "obd", "sparsity": 0.6}'])).pruning
    assert type(got).__name__ == "KOBD" and got.sparsity == 0.6
    assert type(parser.instantiate(parser.parse_args(["--pruning", '{"sparsity": 0.2}'])).pruning).__name__ == "Surgeon"
    with pytest.raises(Exception, match="calibration_samples"):  # magnitude reads no text: not its field
        parser.parse_args(["--pruning", '{"method": "magnitude", "calibration_samples": 3}'])
    with pytest.raises(ValueError, match="pruning.method: 'sparsegpt' is not one of"):
        pruner_from({"method": "sparsegpt"})
    with pytest.raises(ValueError, match="Magnitude takes"):
        pruner_from({"method": "magnitude", "calibration_samples": 8})


def test_calibration_comes_from_data_that_has_it_and_a_method_without_it_needs_none():
    class Stream:
        hparams = {"batch_size": 4}

        def calibration_batches(self, n):
            return [torch.zeros(4, 9, dtype=torch.long)] * n

    assert len(calibration_batches(pruner_from({"method": "obd", "calibration_samples": 10}), Stream())) == 3
    assert calibration_batches(pruner_from({"method": "magnitude"}), object()) == []
    with pytest.raises(ValueError, match="model.pruning: obd needs calibration text, which object does not"):
        calibration_batches(pruner_from({"method": "obd"}), object())
