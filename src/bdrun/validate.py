"""Checks of numbers a user sets in a config: each returns the value as the type its setting
needs, or raises a one-line BdrunError that names the key and the value."""

from __future__ import annotations

import math
from typing import Any

from bdrun.errors import BdrunError

FLOAT32_MAX = 3.4028234663852886e38


def coerce(value: Any, type_name: str, name: str) -> Any:
    """A config value as the int or float its setting needs, or a BdrunError naming it."""
    kind = {"int": int, "float": float}.get(type_name)
    if kind is None or (isinstance(value, int) and kind is int and not isinstance(value, bool)):
        return value
    what = "an integer" if kind is int else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BdrunError(f"{name}={value!r} must be {what}") from None
    if isinstance(value, bool) or (kind is int and number != int(number)):
        raise BdrunError(f"{name}={value!r} must be {what}")
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise BdrunError(
            f"{name}={value!r} is out of range: models compute in float32 (|x| <= 3.4e38)"
        )
    return kind(number)


def fraction(value: Any, name: str, allow_none: bool = False) -> float | None:
    """A config value in [0, 1] as a float (None passes when allowed), else a BdrunError."""
    if value is None and allow_none:
        return None
    number = coerce(value, "float", name)
    if not 0 <= number <= 1:
        raise BdrunError(f"{name}={value} must be a fraction in [0, 1]")
    return number


def check_schedule(lr: Any, epochs: Any, prefix: str = "defense") -> tuple[float, int]:
    """(lr, epochs) as numbers, or a BdrunError naming the bad value."""
    lr = coerce(lr, "float", f"{prefix}.lr")
    epochs = coerce(epochs, "int", f"{prefix}.epochs")
    if lr <= 0 or epochs < 0:
        raise BdrunError(f"{prefix}.lr={lr} must be > 0 and {prefix}.epochs={epochs} >= 0")
    return lr, epochs


def check_sgd(batch_size: Any, momentum: Any, weight_decay: Any) -> tuple[int, float, float]:
    """(batch_size, momentum, weight_decay) of a defense's own SGD as numbers, or a BdrunError."""
    batch_size = coerce(batch_size, "int", "defense.batch_size")
    momentum = coerce(momentum, "float", "defense.momentum")
    weight_decay = coerce(weight_decay, "float", "defense.weight_decay")
    if batch_size < 1 or momentum < 0 or weight_decay < 0:
        raise BdrunError(
            "defense.batch_size must be >= 1, defense.momentum and defense.weight_decay >= 0"
        )
    return batch_size, momentum, weight_decay


def at_least(
    value: Any, kind: str, key: str, minimum: float, example: Any, group: str = "defense"
) -> Any:
    """A setting `group.key` as an int or float that is >= minimum, else a one-line error."""
    number = coerce(value, kind, f"{group}.{key}")
    if number < minimum:
        raise BdrunError(f"{group}.{key}={number} must be >= {minimum:g}, e.g. {example}")
    return number


def positive(value: Any, key: str, example: Any, group: str = "defense") -> float:
    """A setting `group.key` as a float > 0, else a one-line error."""
    number = coerce(value, "float", f"{group}.{key}")
    if number <= 0:
        raise BdrunError(f"{group}.{key}={number} must be > 0, e.g. {example}")
    return number


def one_of(value: Any, key: str, choices: tuple[str, ...], group: str = "defense") -> str:
    """A setting `group.key` if it is one of `choices`, else a one-line error listing them."""
    if value not in choices:
        raise BdrunError(f"{group}.{key}={value!r} must be one of {', '.join(choices)}")
    return str(value)


def flag(value: Any, key: str, group: str = "defense") -> bool:
    """A setting `group.key` that must be true or false, else a one-line error."""
    if not isinstance(value, bool):
        raise BdrunError(f"{group}.{key}={value!r} must be true or false")
    return value
