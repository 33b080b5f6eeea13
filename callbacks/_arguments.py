"""Checks of the callbacks' arguments, where they are given (``__init__``).

Every callback argument is plain YAML data (numbers, strings, booleans, lists of globs,
mappings, file paths), and a wrong one must stop the run at once with one line that names the
callback and the argument, the value and what is allowed: not a traceback from deep inside a
training step hours later. The checks are strict about types, because Python is not: ``True``
is an ``int`` (``block_size=True`` would be a block of one column), and ``"0.9" < 1`` raises a
bare ``TypeError`` that names nothing. Each function returns the value, converted where that
is lossless (an int given for a float).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["flag", "globs", "integer", "number", "one_of", "existing_file", "glob_mapping", "shown"]


# pragma: no mutate start  (wording of messages only: docs/mutation_testing.md)
def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
# pragma: no mutate end


def _fail(owner: str, name: str, wanted: str, value: Any) -> ValueError:
    return ValueError(f"{owner}: {name} must be {wanted}, got {shown(value)}")


# pragma: no mutate start  (wording of messages only: docs/mutation_testing.md)
def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(minimum: Optional[float], maximum: Optional[float], low_open: bool, high_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if low_open else '['}{_bound(minimum)}, {_bound(maximum)}{')' if high_open else ']'}"
    if minimum is not None:
        return f" {'>' if low_open else '>='} {_bound(minimum)}"
    if maximum is not None:
        return f" {'<' if high_open else '<='} {_bound(maximum)}"
    return ""
# pragma: no mutate end


def integer(owner: str, name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An int (not a bool, not a float, not a string) in [minimum, maximum]."""
    wanted = "an integer" + _range_text(minimum, maximum, False, False)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(owner, name, wanted, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(owner, name, wanted, value)
    return value


def number(owner: str, name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite int or float (not a bool, not a string) in the range; ``*_open``: that end excluded."""
    wanted = "a finite number" + _range_text(minimum, maximum, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(owner, name, wanted, value)
    if minimum is not None and (value < minimum or (low_open and value == minimum)):
        raise _fail(owner, name, wanted, value)
    if maximum is not None and (value > maximum or (high_open and value == maximum)):
        raise _fail(owner, name, wanted, value)
    return float(value)


def flag(owner: str, name: str, value: Any) -> bool:
    """True or False (not 1, not "yes")."""
    if not isinstance(value, bool):
        raise _fail(owner, name, "true or false", value)
    return value


def one_of(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise _fail(owner, name, f"one of {list(choices)}", value)
    return value


def globs(owner: str, name: str, value: Any, allow_empty: bool = True) -> list[str]:
    """A list of name globs (strings); a single string is refused (it would be iterated by letter)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(item, str) and item for item in value):
        raise _fail(owner, name, "a list of globs such as ['model.*'] (not a single string)", value)
    if not allow_empty and not value:
        raise _fail(owner, name, "a non-empty list of globs (['*'] selects every module)", value)
    return list(value)


def glob_mapping(owner: str, name: str, value: Any, check_value) -> dict[str, Any]:
    """A mapping glob -> value (None: empty); ``check_value(entry_name, v)`` checks each value."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) and key for key in value):
        raise _fail(owner, name, "a mapping of globs to values, e.g. {'*attn.*': 4}", value)
    return {key: check_value(f"{name}[{key!r}]", item) for key, item in value.items()}


def existing_file(owner: str, name: str, value: Any) -> str:
    """A path (string) of an existing file; FileNotFoundError (one line, naming both) if there is none."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise _fail(owner, name, "the path of a file", value)
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{owner}: {name} {value}: no such file")
    if not path.is_file():
        raise ValueError(f"{owner}: {name} {value}: not a file")
    return value
