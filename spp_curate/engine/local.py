"""The local engine: units run in this process, or in a pool of forked processes on this machine."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from typing import Any, Sequence

from .base import OnResult, Work, check_complete

_work: Work | None = None


def _init_worker(work: Work) -> None:
    global _work
    _work = work
    work.setup()


def _run(item: tuple[int, Any]) -> tuple[int, Any]:
    assert _work is not None
    position, unit = item
    return position, _work(unit)


class LocalEngine:
    name = "local"

    def map(self, work: Work, units: Sequence[Any], workers: int = 0,
            on_result: OnResult | None = None) -> list[Any]:
        results: list[Any] = [None] * len(units)
        positions = []
        with contextlib.ExitStack() as stack:
            if workers > 0 and len(units) > 1:
                # fork: each worker inherits the work object as it is (an open source needs no pickling)
                pool = stack.enter_context(mp.get_context("fork").Pool(workers, initializer=_init_worker,
                                                                        initargs=(work,)))
                done = pool.imap(_run, enumerate(units))
            else:
                work.setup()
                done = ((position, work(unit)) for position, unit in enumerate(units))
            for position, result in done:
                results[position] = result
                positions.append(position)
                if on_result:
                    on_result(position, result)
        check_complete(positions, len(units), type(work).__name__)
        return results
