"""The pruning methods, by the name a config gives as ``pruning.method``. Adding one is a file in ``chop/pruning/``
holding a ``Pruner`` dataclass (its own settings, ``method: Literal["<name>"]``, and ``prune``) plus its line here."""

from __future__ import annotations

import importlib
from typing import Any, Union

from chop.pruning.pruner import Pruner

PRUNERS: dict[str, str] = {
    "surgeon": "chop.pruning.surgeon.Surgeon",
    "obd": "chop.pruning.surgeon.KOBD",
    "magnitude": "chop.pruning.magnitude.Magnitude",
    "wanda": "chop.pruning.wanda.Wanda",
    "activation": "chop.pruning.activation.Activation",
}


def pruner_class(method: str) -> type[Pruner]:
    if method not in PRUNERS:
        raise ValueError(f"pruning.method: '{method}' is not one of {list(PRUNERS)}")
    module, _, name = PRUNERS[method].rpartition(".")
    return getattr(importlib.import_module(module), name)


# The type of a ``pruning:`` setting: the config's ``method`` picks the dataclass (the first, Surgeon, without one),
# and each accepts only its own fields, so ``--help`` and errors name them.
Pruning = Union[tuple(pruner_class(m) for m in PRUNERS)]  # type: ignore[valid-type]


def pruner_from(value: Any) -> Pruner:
    """A pruner from its settings: a ``Pruner`` as it is, or a dict (``method`` picks the class; default surgeon)."""
    if value is None or isinstance(value, Pruner):
        return value
    settings = dict(value)
    cls = pruner_class(settings.get("method", "surgeon"))
    settings.pop("method", None)
    try:
        return cls(**settings)
    except TypeError as e:
        raise ValueError(f"model.pruning: {e} ({cls.__name__} takes {sorted(cls.__dataclass_fields__)})") from None
