"""The one table of stages: name, what each reads and writes, its runner, its help.

Which recipe fields a stage's output depends on is said by each field (``config.knob``'s ``stage``).
``config`` reads the names (fingerprints), ``stages`` the inputs, outputs and runners,
and the CLI the names and help texts, so adding a stage is one row here and
one module. Runners are named as ``module:function`` and imported on demand:
``spp-curate verify`` should not pay for torch and faiss.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from . import layout


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    runner: str
    help: str
    #: Files of the build directory that the stage reads but no stage writes (decisions made by hand):
    #: a change to one of them makes the stage run again.
    watches: tuple[str, ...] = ()
    #: Files watched only when a recipe property is set: ``(file, property)``.
    watches_if: tuple[tuple[str, str], ...] = ()

    def watched(self, recipe: Any) -> tuple[str, ...]:
        return self.watches + tuple(f for f, prop in self.watches_if if getattr(recipe, prop, None) is not None)

    def run(self, recipe: Any, build_dir: Any, engine: Any, **options: Any) -> dict[str, Any]:
        """Run the stage on a build directory, its units of work mapped by ``engine`` (``options``: what the
        runner takes besides, e.g. the index stage's ``rehash``)."""
        from .progress import heartbeat

        module, _, function = self.runner.partition(":")
        with heartbeat(f"{self.name}: loading its libraries"):  # torch, faiss, matplotlib: seconds on a small CPU
            fn: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), function)
        return fn(recipe, build_dir, engine, **options)


PIPELINE: tuple[Stage, ...] = (
    Stage("index", (), (layout.INDEX, layout.QUARANTINE), "spp_curate.curate.index:index_source",
          "Index the source: read and hash every file, check it (from the header of a whole JPEG, else by "
          "decoding it); bad ones go to quarantine.parquet."),
    Stage("embed", (layout.INDEX,), (layout.EMBEDDINGS_META,), "spp_curate.curate.embed:embed_index",
          "Embed the indexed images into float16, L2-normalised chunks (resumable): the one pass that decodes "
          "pixels; an image that does not decode is added to quarantine.parquet."),
    Stage("exclude", (layout.INDEX,), (layout.EXCLUSION, layout.EXCLUSION_STATS),
          "spp_curate.leakage.exclude:exclude_near",
          "Find near-copies of the --exclude-near reference sets; they never enter a pair (exclusion.parquet)."),
    Stage("mine", (layout.INDEX, layout.EMBEDDINGS_META, layout.EXCLUSION),
          (layout.PAIRS, layout.MINE_STATS, layout.WHITENING),
          "spp_curate.pairing.mine:mine_pairs",
          "Mine semantic pairs with faiss kNN and the pair rules into pairs.parquet.",
          # --min-similarity precision:P is resolved on the reviewed sample
          watches_if=((layout.REVIEWS, "precision_target"),)),
    Stage("report", (layout.INDEX, layout.QUARANTINE, layout.PAIRS, layout.MINE_STATS),
          (layout.METRICS, layout.REPORT_HTML),
          "spp_curate.pairing.quality:write_report",
          "Write report/: metrics.json, pair grids, histograms, index.html."),
    Stage("export", (layout.INDEX, layout.QUARANTINE, layout.PAIRS, layout.METRICS),
          (f"{layout.RELEASE}/{layout.MANIFEST}",),
          "spp_curate.export.release:export_release",
          "Write release/: Parquet and WebDataset shards, dataset card, manifest.json.", watches=(layout.REVIEWS,)),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in PIPELINE}
STAGES: tuple[str, ...] = tuple(STAGE_BY_NAME)
