"""Quantities in manifests: token counts like ``2T`` / ``252M`` / ``4Mi`` and floats like ``3e-4``.

Decimal suffixes (K, M, B/G, T) follow SI, as model reports do ("2T tokens"); binary suffixes (Ki, Mi, Gi, Ti)
exist because batch sizes are usually powers of two (Llama 3's "4M tokens" batch is 1024 x 4096 = 4Mi).
Nothing is rounded: a quantity that is not a whole number of tokens is an error, never silently truncated.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Literal

_SUFFIXES = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "B": 10**9,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]i?)?\s*$", re.ASCII)
# What a count or duration written as a string must look like; the CRD states the same patterns, so the apiserver
# refuses `seqLen: long` at `kubectl apply` (operator/crd.py). RE2-compatible: Kubernetes evaluates them in Go, where
# \s and \d are ASCII only; re.ASCII and fullmatch give Python the same reading (its \d takes '١٠٠' and its $ a
# trailing newline).
COUNT_PATTERN = _QUANTITY.pattern
# Counts are carried as int64 by Kubernetes and torch; refusing larger ones before int() also keeps '1e999999999'
# from building a billion-digit integer (limits.py has the tighter bound of each field).
_MAX_COUNT_DIGITS = 19
# A float written as a string: ASCII digits only (float() also reads '١٠٠' and '１e3' as numbers, and '1_0').
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


class QuantityError(ValueError):
    """A quantity that cannot be read; the message says what was expected."""


def parse_count(value: object) -> int:
    """An exact whole count from an int or a string such as ``"2T"``, ``"252M"``, ``"4Mi"``, ``"1e9"``."""
    if isinstance(value, bool):
        raise QuantityError(f"expected a count such as 4096, '252M' or '4Mi', got the boolean {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise QuantityError(f"expected a whole number, got {value}")
    if not isinstance(value, str):
        raise QuantityError(f"expected a count such as 4096, '252M' or '4Mi', got {type(value).__name__}")
    match = _QUANTITY.fullmatch(value)
    if not match or match.group(2) not in _SUFFIXES and match.group(2) is not None:
        raise QuantityError(
            f"cannot read {value!r} as a count; write a number with an optional suffix "
            "K, M, B (or G), T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), e.g. '2T' or '4Mi'"
        )
    number, suffix = match.group(1).replace("_", ""), match.group(2) or ""
    try:
        mantissa = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise QuantityError(f"cannot read {value!r} as a count") from exc
    # Checked before multiplying: Decimal overflows (an exception) past 10^999999 and rounds to 0 below 10^-999999.
    if mantissa and mantissa.adjusted() <= -_MAX_COUNT_DIGITS:
        raise QuantityError(f"{value!r} is not a whole number")
    exact = mantissa * _SUFFIXES[suffix] if mantissa.adjusted() < _MAX_COUNT_DIGITS else mantissa
    if exact.adjusted() >= _MAX_COUNT_DIGITS:
        raise QuantityError(f"{value!r} is too large for any count (more than 10^{_MAX_COUNT_DIGITS - 1})")
    if exact != exact.to_integral_value():
        raise QuantityError(f"{value!r} is {exact} tokens, not a whole number")
    return int(exact)


def parse_float(value: object) -> float:
    """A finite float from a number or a string such as ``"3e-4"`` (YAML 1.1 reads ``3e-4`` as a string)."""
    if isinstance(value, bool):
        raise QuantityError(f"expected a number, got the boolean {value}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        if not _FLOAT.fullmatch(value.strip(" ")):
            raise QuantityError(f"cannot read {value!r} as a number; write e.g. 3e-4 or 0.0003 (ASCII digits)")
        result = float(value.strip(" "))
    else:
        raise QuantityError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(result):
        raise QuantityError(f"expected a finite number, got {value!r}")
    return result


def format_count(count: int) -> str:
    """A short human form: 2000000000000 -> '2T', 1600000 -> '1.6M', 4194304 -> '4Mi', 1234 -> '1.234K'.

    Exact whenever possible (a whole number of a decimal unit first, then of a binary unit); otherwise
    three significant digits with a leading '~'.
    """
    if count < 1000:
        return str(count)
    for suffix in ("T", "B", "M", "K"):
        scale = _SUFFIXES[suffix]
        if count % scale == 0 and count // scale < 1000:
            return f"{count // scale}{suffix}"
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        scale = _SUFFIXES[suffix]
        if count % scale == 0 and count // scale < 1024:
            return f"{count // scale}{suffix}"
    for suffix in ("T", "B", "M", "K"):
        scale = _SUFFIXES[suffix]
        if count >= scale:
            value = Decimal(count) / scale
            if value == round(value, 3):
                return f"{value.normalize():f}{suffix}"
            return f"~{float(value):.3g}{suffix}"
    return str(count)  # pragma: no cover


_DURATION = re.compile(r"^\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$", re.ASCII)
DURATION_PATTERN = _DURATION.pattern


def parse_duration(value: object) -> int:
    """Whole seconds from an int or a string such as ``"90s"``, ``"15m"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise QuantityError(f"expected a duration such as '15m' or 900, got the boolean {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match and any(match.groups()) and all(len(g or "") <= _MAX_COUNT_DIGITS for g in match.groups()):
            hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
            return hours * 3600 + minutes * 60 + seconds
    raise QuantityError(f"cannot read {value!r} as a duration; write e.g. '90s', '15m', '1h30m' or seconds as a number")


# A Kubernetes resource quantity (resource.Quantity) as a string: a non-negative decimal with an optional SI suffix
# (m, k, M, G, T, P, E), binary suffix (Ki ... Ei) or exponent, e.g. '1', '500m', '64Gi', '1e3'. The CRD states it
# for the string form of extra container resources (operator/crd.py); an integer is a quantity as it is.
RESOURCE_QUANTITY_PATTERN = r"^(\+)?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?$"
_RESOURCE_QUANTITY = re.compile(RESOURCE_QUANTITY_PATTERN)


def parse_resource_quantity(value: object) -> str:
    """A Kubernetes resource quantity as the string a pod spec carries: ``1`` -> ``'1'``, ``'500m'`` as it is."""
    if isinstance(value, float):  # the CRD takes an integer or a string, as Kubernetes does for quantities
        raise QuantityError(f"expected a Kubernetes quantity, got the number {value}: quote it ('{value}') or use m")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        kind = f"the boolean {str(value).lower()}" if isinstance(value, bool) else type(value).__name__
        raise QuantityError(f"expected a Kubernetes quantity such as 1, '500m' or '64Gi', got {kind}")
    text = str(value)
    if not _RESOURCE_QUANTITY.fullmatch(text):
        raise QuantityError(f"cannot read {value!r} as a Kubernetes quantity; write e.g. 1, '500m', '64Gi' or '1e3'")
    return text


_RESOURCE_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{s: Decimal(10) ** (3 * (i + 1)) for i, s in enumerate("kMGTPE")},
    **{f"{s}i": Decimal(2) ** (10 * (i + 1)) for i, s in enumerate("KMGTPE")},
}


def resource_quantity_value(text: str) -> Decimal:
    """The amount a (valid) resource quantity stands for: ``'1'``, ``'1000m'`` and ``'1e0'`` are all 1."""
    match = _RESOURCE_QUANTITY.fullmatch(text)
    if not match:
        raise QuantityError(f"cannot read {text!r} as a Kubernetes quantity")
    number, suffix = Decimal(match.group(2)), match.group(4) or ""
    if suffix[:1] in ("e", "E"):
        # Kubernetes refuses quantities past 2^63 milli-units; clamping far beyond that keeps '1e999999999' from
        # overflowing Decimal while still comparing as larger than any real amount.
        return number * Decimal(10) ** max(-100, min(100, int(suffix[1:])))
    return number * _RESOURCE_SUFFIXES[suffix]


def format_duration(seconds: float, style: Literal["exact", "approx"] = "exact") -> str:
    """A duration for people, in one of two styles.

    ``exact`` (settings and the operator's events; ``parse_duration`` reads it back), whole seconds:
    900 -> '15m', 5400 -> '1h30m', 45 -> '45s'. ``approx`` (the ETAs of ``stagerun plan``, where more digits would
    only be noise), one unit: 45 -> '45s', 900 -> '15m', 7200 -> '2.0h', 259200 -> '3.0d'.
    """
    if style == "approx":
        if seconds < 90:
            return f"{seconds:.0f}s"
        if seconds < 5400:
            return f"{seconds / 60:.0f}m"
        if seconds < 2 * 86400:
            return f"{seconds / 3600:.1f}h"
        return f"{seconds / 86400:.1f}d"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"
