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

from .base import Engine, OnResult, Work, check_complete

__all__ = ["Engine", "OnResult", "Work", "check_complete", "get_engine"]


def get_engine(name: str) -> Engine:
    """The engine a recipe names; Ray is imported only when asked for."""
    if name == "ray":
        from .ray import RayEngine

        return RayEngine()
    from .local import LocalEngine

    return LocalEngine()
