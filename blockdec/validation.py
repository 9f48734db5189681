"""Argument checks shared by the public entry points and the specs.

Errors are for people: each names the argument, its value and what is
allowed. A value of the wrong type raises `TypeError`, a value of the right
type outside its range `ValueError`. NumPy scalars are accepted wherever
Python numbers are, and come back as Python numbers, so that specs and
configs holding them hash, compare and serialise like the plain ones (they
are static jit arguments and JSON files).

    check_int("max_new_tokens", np.int64(8), low=1)       -> 8
    check_int("eos_id", 2.5, low=0, high=31)
      TypeError: eos_id=2.5 must be an integer in [0, 31].
    check_number("norm_eps", "1e-6", low=0, low_open=True)
      TypeError: norm_eps='1e-6' must be a number > 0.
"""

from __future__ import annotations

import math

import numpy as np


def is_int(value) -> bool:
  """True for Python and NumPy integers; bools are not integers here."""
  return (isinstance(value, (int, np.integer))
          and not isinstance(value, (bool, np.bool_)))


def is_number(value) -> bool:
  """True for Python and NumPy reals (ints included, bools excluded)."""
  return is_int(value) or isinstance(value, (float, np.floating))


def _allowed(kind: str, low, high, low_open: bool, optional: bool) -> str:
  if kind == "an integer" and low == 1 and high is None:
    text = "a positive integer"
  elif low is not None and high is not None:
    text = f"{kind} in {'(' if low_open else '['}{low}, {high}]"
  elif low is not None:
    text = f"{kind} {'>' if low_open else '>='} {low}"
  elif high is not None:
    text = f"{kind} <= {high}"
  else:
    text = kind
  return f"None or {text}" if optional else text


def check_int(name: str, value, *, low: int | None = None,
              high: int | None = None, optional: bool = False,
              hint: str = "") -> int | None:
  """`value` as a Python int, or TypeError / ValueError naming `name`.

  Args:
    name: the argument as the caller wrote it, e.g. "eos_id" or "TopK n".
    value: the value to check.
    low, high: inclusive bounds, or None.
    optional: None is allowed (and returned).
    hint: appended to the message, e.g. " (the model's vocabulary)".
  """
  if value is None and optional:
    return None
  allowed = _allowed("an integer", low, high, False, optional)
  if not is_int(value):
    raise TypeError(f"{name}={value!r} must be {allowed}{hint}.")
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"{name}={value!r} must be {allowed}{hint}.")
  return int(value)


def check_number(name: str, value, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 optional: bool = False, hint: str = "") -> float | None:
  """`value` as a finite Python float, or TypeError / ValueError naming `name`.

  `low` is exclusive with `low_open`, else inclusive; `high` is inclusive.
  """
  if value is None and optional:
    return None
  allowed = _allowed("a number", low, high, low_open, optional)
  if not is_number(value):
    raise TypeError(f"{name}={value!r} must be {allowed}{hint}.")
  x = float(value)
  if (not math.isfinite(x) or (low is not None and (x <= low if low_open
                                                    else x < low))
      or (high is not None and x > high)):
    raise ValueError(f"{name}={value!r} must be {allowed}{hint}.")
  return x


def check_bool(name: str, value) -> bool:
  """`value` as a Python bool (NumPy bools too), or TypeError naming `name`.

  Strings such as 'no' are refused: `bool('no')` is True.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}={value!r} must be True or False.")
  return bool(value)


def check_int_dtype(name: str, array) -> None:
  """TypeError naming `name` unless `array` holds integers."""
  dtype = np.dtype(array.dtype) if hasattr(array, "dtype") else None
  if dtype is None or dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {dtype} "
                    "(cast with .astype(np.int32) if the values are whole "
                    "numbers).")
