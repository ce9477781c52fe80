"""The Ray engine: the same units of work, on a Ray cluster.

Each worker is a Ray actor that runs the work's ``setup()`` once and then takes
units; an actor that dies is restarted (``setup()`` again) and its unit retried,
so a lost worker costs time, not results. Results come back as they finish and
are put in unit order; every unit must arrive exactly once. Actors ask for one
GPU each where the work wants one and the cluster has them (one actor per GPU),
else one CPU. Connects to ``RAY_ADDRESS`` when set, else starts a local cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ray
from ray.util import ActorPool

from .base import OnResult, Work, check_complete

RETRIES = {"max_restarts": -1, "max_task_retries": -1}


def ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, logging_level=logging.WARNING)


class _Worker:
    def __init__(self, work: Work) -> None:
        self.work = work
        work.setup()

    def run(self, position: int, unit: Any) -> tuple[int, Any]:
        return position, self.work(unit)


class RayEngine:
    name = "ray"

    def map(self, work: Work, units: Sequence[Any], workers: int = 0,
            on_result: OnResult | None = None) -> list[Any]:
        if not units:
            return []
        ensure_ray()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if work.gpus else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        size = max(1, min(len(units), gpus or min(workers or cpus, cpus)))
        # Named after the work, so its processes are recognisable (``ray::EmbedWorkActor``).
        actor_class = ray.remote(type(f"{type(work).__name__}Actor", (_Worker,), {}))
        actors = [actor_class.options(num_gpus=1 if gpus else 0, num_cpus=1, **RETRIES).remote(work)
                  for _ in range(size)]
        results: list[Any] = [None] * len(units)
        positions = []
        pool = ActorPool(actors)
        for position, result in pool.map_unordered(lambda actor, item: actor.run.remote(*item),
                                                   list(enumerate(units))):
            results[position] = result
            positions.append(position)
            if on_result:
                on_result(position, result)
        for actor in actors:
            ray.kill(actor)
        check_complete(positions, len(units), type(work).__name__)
        return results
