"""The engine interface: what a stage hands an engine (:class:`Work`) and what an engine offers (:class:`Engine`).

Its own module, so that the engines import it and not the package that picks one of them.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np


class Work(Protocol):
    """A stage's unit of work.

    ``setup()`` runs once in each worker before its first unit (open the source, build the model,
    load the index); ``__call__(unit)`` returns the unit's result. ``gpus`` is how many GPUs
    one worker wants (0 or 1).
    """

    gpus: int

    def setup(self) -> None: ...

    def __call__(self, unit: Any) -> Any: ...


OnResult = Callable[[int, Any], None]


class Engine(Protocol):
    name: str

    def map(self, work: Work, units: Sequence[Any], workers: int = 0,
            on_result: OnResult | None = None) -> list[Any]:
        """``work`` over every unit, results in unit order; ``workers`` parallel processes (0: in this one)."""
        ...


def check_complete(positions: Sequence[int], n: int, what: str) -> None:
    """Fail loudly unless every position below ``n`` arrived exactly once."""
    seen = np.sort(np.asarray(positions, dtype=np.int64))
    if len(seen) != n or not np.array_equal(seen, np.arange(n)):
        raise RuntimeError(f"engine: {what} returned {len(seen)} results for {n} units "
                           f"({len(np.unique(seen))} distinct)")
