"""Budget arithmetic: what `keep` means and how many tokens each image keeps."""

from __future__ import annotations

import math
from numbers import Integral, Real

from .checks import BadType, BadValue


def parse_keep(text: str) -> int | float:
    """A budget as a command line gives it: ``"64"`` is a token count, ``"0.25"`` or ``"1e-3"`` a fraction.

    An integer written without a decimal point or exponent is a token count;
    any other number is a float (range checked by `validate_keep`: ``"1"`` is
    one token, ``"1.0"`` the full budget). Text that is no number raises a
    ValueError naming it and what is allowed.
    """
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise BadValue(
            f"keep {text!r} is not a number: give a token count (an integer such as 64) or a fraction in (0, 1] (such as 0.25)"
        ) from None


def is_full_budget(keep: object) -> bool:
    """Whether `keep` is the full budget: the float 1.0 (the int 1 is one token per image)."""
    return isinstance(keep, float) and keep == 1.0


def validate_keep(keep: object, name: str = "keep") -> int | float:
    """Return `keep` if it is a valid budget, else raise.

    An int is a token count per image (>= 1); a float in (0, 1] is a fraction
    of each image's visual tokens. Bools, NaN, zero, negatives and floats
    above 1 are refused: a config that says ``ratio: 9`` is an error, not 0.9.
    """
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise BadType(
            f"{name} must be an int token count >= 1 or a float fraction in (0, 1]; got {keep!r} of type {type(keep).__name__}"
        )
    if isinstance(keep, Integral):
        if keep < 1:
            raise BadValue(f"{name} as a token count must be >= 1; got {keep}")
        return int(keep)
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise BadValue(f"{name} as a fraction must be in (0, 1]; got {keep}")
    return keep


def resolve_budget(keep: int | float, n_alive: int, n_original: int, rounding: str = "round") -> int:
    """Tokens an image keeps at one stage.

    A fraction is taken of the image's original count (``n_original``), so a
    later stage of a Pipeline states its budget in the same units as the
    papers (TransPrune: ``int(N0 * r)``). The result is at least 1 and never
    more than the tokens still alive.
    """
    if n_alive == 0:
        return 0
    if isinstance(keep, int):
        k = keep
    elif rounding == "floor":
        k = int(n_original * keep)
    else:
        k = int(round(n_original * keep))
    return max(1, min(k, n_alive))


def split_budget(sizes: list[int], k: int) -> list[int]:
    """Split `k` over groups of the given sizes, proportionally (largest remainder).

    Every group gets at most its size; ties in the remainder go to the first
    group. The parts always sum to ``min(k, sum(sizes))``.
    """
    total = sum(sizes)
    k = min(k, total)
    if total == 0:
        return [0 for _ in sizes]
    exact = [k * s / total for s in sizes]
    parts = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    left = k - sum(parts)
    while left > 0:
        for i in order:
            if left == 0:
                break
            if parts[i] < sizes[i]:
                parts[i] += 1
                left -= 1
    return parts
