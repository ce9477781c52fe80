"""Where a stage's units of work run: the local engine (this machine) or the Ray engine (a cluster).

A stage cuts its work into units (a batch of items to probe, a chunk of images
to encode, a block of queries to search, a shard to write) and hands an engine
a :class:`Work` object and the units. The engine maps the work over the units,
retries what a lost worker did not finish, hands each result to ``on_result``
as it arrives, and returns the results in unit order, failing loudly if any
unit is lost or arrives twice. Engines import no stage and stages import no
engine (``stages.py`` picks one from the recipe and passes it in), as
img2dataset's distributor never imports its downloader.
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


def get_engine(name: str) -> Engine:
    """The engine a recipe names; Ray is imported only when asked for."""
    if name == "ray":
        from .ray import RayEngine

        return RayEngine()
    from .local import LocalEngine

    return LocalEngine()
