"""argparse value types that say what is wrong with a number (`--epochs: must be > 0, got -1`)."""
from __future__ import annotations

import argparse
from typing import Callable

from modelrepo import RepositoryError, check_name


def bounded(kind: type, minimum: float, *, inclusive: bool = True, below: float | None = None) -> Callable[[str], float]:
    """A `kind` (int or float) >= minimum (> minimum when not inclusive), and < below when given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if (value < minimum if inclusive else value <= minimum) or (below is not None and value >= below):
            bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and < {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = bounded(int, 0, inclusive=False)
non_negative_int = bounded(int, 0)
positive_float = bounded(float, 0, inclusive=False)
non_negative_float = bounded(float, 0)
fraction = bounded(float, 0, inclusive=False, below=1)  # strictly between 0 and 1
ratio = bounded(float, 0, below=1)  # 0 included, 1 excluded


def repository_name(text: str) -> str:
    """A model name the model repository accepts."""
    try:
        check_name(text)
    except RepositoryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
