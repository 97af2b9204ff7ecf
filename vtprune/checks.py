"""The checks of policy options, in one place: strict types, the value and the allowed range in every message.

``True`` is not an int and ``"yes"`` is not a bool here: a config that says
``per_image: "false"`` is an error, not a truthy string.

Bad input is raised where it enters as a `UserInputError`: `BadType` (a
`TypeError`: a value of the wrong type) or `BadValue` (a `ValueError`: the
right type, a value outside what is allowed). The command line prints these
as one line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


class UserInputError(Exception):
    """Input vtprune cannot use (an option, a budget, a model it does not support, a file path), named in the message."""


class BadValue(UserInputError, ValueError):
    """An input of the right type with a value outside what is allowed."""


class BadType(UserInputError, TypeError):
    """An input of the wrong type."""


def as_user_error(err: ValueError | TypeError) -> UserInputError:
    """`err` as a `BadType` / `BadValue` with the same message (itself when it is one already)."""
    if isinstance(err, UserInputError):
        return err
    new = (BadType if isinstance(err, TypeError) else BadValue)(*err.args)
    new.__cause__ = err
    return new


def check_bool(who: str, name: str, value: object, allow_none: bool = False) -> bool | None:
    """`value` if it is a bool (or None where allowed), else a TypeError."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise BadType(f"{who}: {name} must be {allowed}; got {value!r} of type {type(value).__name__}")
    return value


def check_int(who: str, name: str, value: object, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """`value` as an int if it is one (not a bool) and at least `minimum`, else a BadType / BadValue."""
    if value is None and allow_none:
        return None
    is_int = isinstance(value, Integral) and not isinstance(value, bool)
    if isinstance(value, Integral) and is_int and (minimum is None or int(value) >= minimum):
        return int(value)
    bound = f" >= {minimum}" if minimum is not None else ""
    none = " or None" if allow_none else ""
    raise (BadValue if is_int else BadType)(f"{who}: {name} must be an int{bound}{none}; got {value!r}")


def check_number(
    who: str,
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """`value` as a float if it is a finite real (not a bool) inside the interval, else a BadType / BadValue."""
    if value is None and allow_none:
        return None
    is_real = isinstance(value, Real) and not isinstance(value, bool)
    if isinstance(value, Real) and is_real and math.isfinite(float(value)):
        v = float(value)
        if (v > low if low_open else v >= low) and (v < high if high_open else v <= high):
            return v
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise (BadValue if is_real else BadType)(f"{who}: {name} must be a number in {interval}; got {value!r}")
