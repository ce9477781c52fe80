"""The mine stage: categories, kNN within each category, the pair rules, and ``pairs.parquet``.

Neighbours are searched within each category (ground-truth label, zero-shot
pseudo-label or k-means cluster), so every anchor gets ``k`` same-category
candidates and the work is N^2/C instead of N^2; with ``category=none`` the
search runs over everything (the SePP-ID semantic sampler alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..config import Recipe
from ..errors import UserError
from ..layout import WHITENING, ChunkedEmbeddings, read_class_names
from ..devices import release_memory
from ..files import write_json, write_table
from ..progress import phase, stage_progress
from ..leakage.exclude import excluded_ids
from . import filters as F
from .categories import Categories, assign_categories, read_class_names_file
from .knn import SearchPlan, ivf_recall, knn_search, plan_search
from .thresholds import resolve_thresholds, threshold_curve
from .duplicates import CopyScoreStore
from ..columns import hex_prefixes
from .whiten import check_fits, embedding_identity, fit_whitening, stored_whitening

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("anchor_id", pa.int64()), ("positive_id", pa.int64()),
    ("similarity", pa.float32()), ("rank", pa.int32()), ("mutual", pa.bool_()),
    ("label", pa.int32()), ("label_name", pa.string()), ("positive_label", pa.int32()),
    ("category", pa.int32()), ("category_source", pa.string()),
])
RECALL_SAMPLE = 1000
#: Queries whose neighbour lists are turned into candidate rows at a time.
CANDIDATE_BLOCK = 65_536


def raw_candidates(vecs: np.ndarray, groups: list[np.ndarray], k: int, engine, plans: list[SearchPlan] | None = None,
                   seed: int = 0, recall: list | None = None, tuning: list | None = None) -> F.Candidates:
    """Each position's ``k`` nearest others within its group, self excluded, with 1-based ranks.

    With ``recall`` given, approximate searches append ``(queries, recall@k)`` to it.
    """
    total = int(sum(len(g) for g in groups))
    # the candidates' columns allocated once (positions as int32 below 2^31 images) and filled group by group:
    # never a list of parts and their concatenation at once
    index_type = np.int32 if len(vecs) < 2**31 else np.int64
    cap = total * k
    anchor_all, positive_all = np.empty(cap, index_type), np.empty(cap, index_type)
    sim_all, rank_all = np.empty(cap, np.float32), np.empty(cap, np.int32)
    at = 0
    with stage_progress("mine: kNN", total, unit="query") as (bar, task):
        for i, g in enumerate(groups):
            if len(g) < 2:
                bar.update(task, advance=len(g))
                continue
            plan = plans[i] if plans else None
            # a group of every row (--category none) is searched in place: no second copy of the vectors
            whole = len(g) == len(vecs) and bool(np.all(g == np.arange(len(g))))
            rows = vecs if whole else vecs[g]
            sims, nb = knn_search(rows, k + 1, engine, plan, seed, on_batch=lambda n: bar.update(task, advance=n),
                                  tuning=tuning)
            if recall is not None and plan is not None and plan.kind != "flat":
                sample = max(50, int(RECALL_SAMPLE * len(g) / total))
                recall.append((len(g), ivf_recall(rows, nb, sample, seed)))
            del rows
            # a block of queries at a time: the (queries x k) temporaries below are int64, a few of them at once
            for lo in range(0, len(g), CANDIDATE_BLOCK):
                nbb = nb[lo: lo + CANDIDATE_BLOCK]
                found = nbb >= 0
                anchor = np.broadcast_to(g[lo: lo + CANDIDATE_BLOCK, None], nbb.shape)
                positive = np.where(found, g[np.clip(nbb, 0, None)], -1)
                is_self = positive == anchor
                rank = np.arange(1, nbb.shape[1] + 1)[None, :] - np.cumsum(is_self, axis=1)
                keep = found & ~is_self & (rank <= k)
                m = int(keep.sum())
                anchor_all[at: at + m], positive_all[at: at + m] = anchor[keep], positive[keep]
                sim_all[at: at + m], rank_all[at: at + m] = sims[lo: lo + CANDIDATE_BLOCK][keep], rank[keep]
                at += m
            del sims, nb
            if plan is not None and plan.kind != "flat":
                release_memory()  # the approximate index's lists, freed with it, go back to the system
    return F.Candidates(anchor_all[:at], positive_all[:at], sim_all[:at], rank_all[:at])  # views: no second copy


@dataclass
class Mined:
    """What the pair rules kept, and what the report needs to show how."""

    kept: F.Candidates  # sorted by anchor, rank
    funnel: F.Funnel
    mutual: np.ndarray  # per kept pair: the anchor is also among the positive's neighbours
    thresholds: dict[str, dict[str, Any]]  # min_similarity and dup_threshold: given, value
    #: which candidates pass every rule but the minimum similarity and the caps (a mask: the candidates are
    #: not copied again), and the candidates it is of
    loose: np.ndarray
    candidates: F.Candidates

    @property
    def unthresholded(self) -> F.Candidates:
        return self.candidates.select(self.loose)


def apply_rules(recipe: Recipe, cand: F.Candidates, n: int, digests: np.ndarray, categories: np.ndarray,
                copy_codes: np.ndarray | None = None, prepared: dict[str, Any] | None = None) -> Mined:
    """The pair rules in order, thresholds resolved on the candidates' own similarities; ``copy_codes`` are the
    unordered pairs whose pictures are copies of each other (:func:`mine_without_copies`). ``prepared`` keeps
    what does not depend on them (the thresholds, the sorted neighbour codes) between calls on the same
    candidates and recipe, so a copy round does not sort the N x k candidates again."""
    prepared = {} if prepared is None else prepared
    if "thresholds" not in prepared:
        prepared["thresholds"] = resolve_thresholds(recipe, cand.similarity)
        codes = F.pair_codes(cand.anchor, cand.positive, n)
        codes.sort()  # in place: no second N x k copy
        prepared["neighbour_codes"] = codes
    thresholds = {k: dict(v) for k, v in prepared["thresholds"].items()}
    neighbour_codes = prepared["neighbour_codes"]
    min_similarity, dup_threshold = (thresholds[f]["value"] for f in ("min_similarity", "dup_threshold"))
    funnel = F.Funnel(cand)
    funnel.apply("below_min_similarity", F.at_least(funnel.candidates, min_similarity))
    funnel.apply("near_duplicate", F.not_near_duplicate(funnel.candidates, dup_threshold, digests))
    funnel.apply("same_picture", F.not_copy(funnel.candidates, copy_codes, n))
    if recipe.mutual:
        funnel.apply("not_mutual", F.is_mutual(funnel.candidates, neighbour_codes, n))
    funnel.apply("anchor_cap", F.top_per_anchor(funnel.candidates, recipe.max_per_anchor,
                                                         recipe.partner, recipe.seed))
    funnel.apply("unordered_duplicate", F.first_of_unordered(funnel.candidates))
    if recipe.pairs_per_class:
        funnel.apply("class_cap", F.balance_per_category(funnel.candidates, categories, recipe.pairs_per_class,
                                                         recipe.seed))
    kept = funnel.candidates
    kept = kept.select(np.lexsort((kept.rank, kept.anchor)))
    loose = F.not_near_duplicate(cand, dup_threshold, digests) & F.not_copy(cand, copy_codes, n)
    if recipe.mutual:
        loose &= F.is_mutual(cand, neighbour_codes, n)
    return Mined(kept, funnel, F.is_mutual(kept, neighbour_codes, n), thresholds, loose, cand)


# The option that loosens each rule, for the message when a rule leaves no pair.
RULE_OPTIONS = {"below_min_similarity": "--min-similarity", "near_duplicate": "--dup-threshold",
                "same_picture": "--copy-threshold",
                "not_mutual": "--mutual", "anchor_cap": "--max-per-anchor", "unordered_duplicate": "--k",
                "class_cap": "--pairs-per-class"}


def no_pairs_error(funnel: F.Funnel, searchable: int) -> UserError:
    """One line saying why no pair survived, naming the option to change."""
    if not funnel.steps[0]["remaining"]:
        return UserError(f"no candidate pairs: {searchable} searchable image(s) and no category holds two; "
                         "pairs need at least two images of a category", option="--source")
    removed = funnel.removed()
    worst = max(removed, key=removed.get)
    steps = ", ".join(f"{k} {v:,}" for k, v in removed.items() if v)
    return UserError(f"no pair survives the rules ({funnel.steps[0]['remaining']:,} candidates; removed: {steps}); "
                     f"loosen {RULE_OPTIONS[worst]}", option=RULE_OPTIONS[worst])


def _search_summary(recipe: Recipe, cats: Categories, plans: list[SearchPlan], recall: list) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for p in plans:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    largest = max(range(len(plans)), key=lambda i: plans[i].nlist, default=None)
    summary: dict[str, Any] = {
        "k": recipe.k, "scope": "all images" if cats.mode == "none" else f"within {cats.mode} categories",
        "groups": len(plans), "index_kinds": kinds, "device": plans[0].device if plans else "cpu",
        "largest_plan": plans[largest].describe() if largest is not None else None,
    }
    if recall:
        summary["ivf_recall_at_k"] = float(sum(n * r for n, r in recall) / sum(n for n, _ in recall))
    return summary


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the engine's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


#: Rounds of "mine, compare the new pairs by picture, mine again" before the copy rule stops looking.
COPY_ROUNDS = 8


def mine_without_copies(recipe: Recipe, cand: F.Candidates, n: int, digests: np.ndarray, categories: np.ndarray,
                        build_dir: Path, engine, known: dict[str, Any] | None = None) -> tuple[Mined, dict[str, Any]]:
    """The pair rules with the copy rule: the pairs the other rules keep are compared by picture
    (``pairing/duplicates.py``), those that are one picture twice are struck, and the rules run again so each
    anchor takes its next candidate, until no kept pair is left uncompared. Every pair that could be mined
    is compared, whatever its similarity (a random-init encoder can put a cropped copy far down the list),
    and no other: the work grows with the pairs kept, not with the candidates. ``known`` carries the pairs
    already compared (``checked``) and found copies (``copies``) from an earlier call on the same candidates;
    it is updated in place. Pictures are compared from the copy descriptors the embed stage kept, in units of
    work ``engine`` spreads over the recipe's workers."""
    prepared: dict[str, Any] = {}
    mined = apply_rules(recipe, cand, n, digests, categories, prepared=prepared)
    if recipe.copy_threshold is None or not len(cand.anchor):
        return mined, {"rule": "off"}
    from ..devices import auto_workers
    from .duplicates import pair_copy_scores

    workers = auto_workers() if recipe.workers is None else recipe.workers
    known = {} if known is None else known
    store = known.get("store")
    checked = known.get("checked", np.empty(0, np.int64))
    copies = known.get("copies", np.empty(0, np.int64))
    if len(copies):
        mined = apply_rules(recipe, cand, n, digests, categories, copies, prepared)
    scores_seen: list[np.ndarray] = []
    rounds = compared = 0
    compare_cpu = 0.0
    while rounds < COPY_ROUNDS:
        codes = np.unique(F.unordered_codes(mined.kept.anchor, mined.kept.positive, n))
        new = np.setdiff1d(codes, checked, assume_unique=True)
        if not len(new):
            break
        rounds += 1
        a, b = new // n, new % n
        scores = np.full(len(new), np.nan, np.float32) if store is None else store.lookup(digests[a], digests[b])
        todo = np.flatnonzero(np.isnan(scores))
        if store is not None:
            store.reused += int(len(new) - len(todo))
        # Round 1 compares the pairs the rules keep; each later round, the next candidates of anchors whose
        # pair was struck as a copy. Pairs compared in an earlier build are read from the store, not compared.
        what = "kept pairs" if rounds == 1 else "next candidates of struck pairs"
        started = cpu_seconds()
        with stage_progress(f"mine: compare pictures, round {rounds} ({what})", len(todo),
                            unit="pair") as (bar, task):
            scores[todo] = pair_copy_scores(build_dir, a[todo], b[todo], engine, workers,
                                            on_batch=lambda k: bar.update(task, advance=k))
        compare_cpu += cpu_seconds() - started
        compared += len(todo)
        if store is not None and len(todo):
            store.add(digests[a[todo]], digests[b[todo]], scores[todo])
        scores_seen.append(scores)
        checked = np.union1d(checked, new)
        found = new[scores >= recipe.copy_threshold]
        if not len(found):
            break
        copies = np.union1d(copies, found)
        mined = apply_rules(recipe, cand, n, digests, categories, copies, prepared)
    known.update(checked=checked, copies=copies)
    scores = np.concatenate(scores_seen) if scores_seen else np.empty(0, np.float32)
    return mined, {"rule": "copy score", "copy_threshold": recipe.copy_threshold, "rounds": rounds,
                   "pairs_compared": int(len(checked)), "copies": int(len(copies)),
                   "scores_reused": int(store.reused) if store is not None else 0,
                   "compared_now": int(compared), "compare_cpu_s": round(compare_cpu, 2),
                   "pairs_per_cpu_s": round(compared / compare_cpu, 1) if compare_cpu > 0 else None,
                   "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")}
                   if len(scores) else {}}


def resolve_precision_target(recipe: Recipe, build_dir: Path, cand: F.Candidates, n: int, digests: np.ndarray,
                             categories: np.ndarray, keys: np.ndarray, target: float, engine,
                             known: dict[str, Any] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """``--min-similarity precision:P`` as a similarity: the pairs the rules keep at any similarity, scored by
    the sample decisions of ``reviews.parquet`` (``review.estimate.precision_threshold``), give the lowest
    threshold whose pairs keep precision ``P``. The same reviews give the same threshold."""
    import pandas as pd

    from ..review import estimate as E
    from ..review import store

    loose, _ = mine_without_copies(recipe.model_copy(update={"min_similarity": "q0"}), cand, n, digests,
                                   categories, build_dir, engine, known)
    kept = loose.kept
    pairs = pd.DataFrame({"key": store.pair_key(keys[kept.anchor], keys[kept.positive]),
                          "similarity": kept.similarity.astype(np.float64)})
    found = E.precision_threshold(pairs, store.read_reviews(build_dir), target)
    if found["value"] is None:
        why = ("no pair of this build was reviewed at random" if not found["reviewed"] else
               f"no threshold keeps precision {target} on the {found['reviewed']} pairs reviewed at random")
        raise UserError(f"precision:{target}: {why}; review a sample with `spp-curate review DIR --estimate 300`, "
                        "or give a similarity or a quantile", option="--min-similarity")
    return (recipe.model_copy(update={"min_similarity": found["value"]}),
            {"given": f"precision:{target:g}", "value": found["value"], "reviewed": found["reviewed"],
             "precision_at_value": found["precision_at_value"], "method": E.METHOD})


def mine_pairs(recipe: Recipe, build_dir: Path, engine) -> dict[str, int]:
    """Write ``pairs.parquet`` and ``mine_stats.json``; return counts."""
    index = pq.read_table(build_dir / layout.INDEX, columns=["id", "label", "label_name", "digest"])
    # read from the chunk files as needed: the embeddings are never whole in memory beside their whitened copy
    vecs = ChunkedEmbeddings(build_dir, np.float16)
    ids = vecs.ids
    if not np.array_equal(ids, index.column("id").to_numpy()):
        raise RuntimeError("embeddings do not cover the index row for row; rerun the embed stage")
    labels = index.column("label").to_numpy().astype(np.int64)
    digests = hex_prefixes(index.column("digest"))  # 8 bytes an image, not a Python string
    index = index.drop_columns(["digest"])
    valid = np.concatenate([vecs[lo: lo + 65_536].any(axis=1) for lo in range(0, len(vecs), 65_536)]) if len(vecs) \
        else np.zeros(0, bool)  # a block at a time: no N x d temporary
    excluded = np.isin(ids, excluded_ids(build_dir))
    valid &= ~excluded  # near-copies of a reference set are never anchors or positives
    n, d = vecs.shape

    class_names = (read_class_names_file(recipe.class_names) if recipe.class_names
                   else read_class_names(build_dir / layout.INDEX))
    cats = assign_categories(recipe.category, vecs if recipe.category in ("label", "none") else np.asarray(vecs),
                             valid, labels, class_names, recipe.encoder, recipe.image_size, recipe.clusters,
                             recipe.seed)
    # The similarity scale, fitted on this build's embeddings (the chunks stay as the encoder wrote them), or
    # with --whiten keep the one this build stored before.
    identity = embedding_identity(json.loads((build_dir / layout.EMBEDDINGS_META).read_text()))
    whitening = (stored_whitening(build_dir / WHITENING, d, identity) if recipe.whiten == "keep" else None)
    if whitening is not None and (why := check_fits(whitening, vecs, valid)):
        raise UserError(f"keep: the build's {WHITENING} cannot be applied to its embeddings ({why}); give pca to fit "
                        "a new scale", option="--whiten")
    if whitening is None:
        with phase(f"mine: fit the similarity scale (--whiten {recipe.whiten}, {int(valid.sum()):,} images)"):
            whitening = fit_whitening(vecs, valid, recipe.whiten, recipe.seed)
        whitening.fitted_on = identity
        whitening.save(build_dir / WHITENING)
    if whitening.kind != "none":
        with phase("mine: apply the similarity scale"):
            vecs = whitening.apply(vecs, dtype=np.float16)  # searched in float32 a block at a time
        release_memory()  # the fit's and the application's blocks, before the search's index is built
    else:
        vecs = np.asarray(vecs)
        d = vecs.shape[1]
    groups = cats.groups(valid)
    plans = [plan_search(len(g), d, recipe.memory, recipe.index, recipe.nprobe) for g in groups]
    recall: list = []
    tuning: list = []
    cand = raw_candidates(vecs, groups, recipe.k, engine, plans, recipe.seed, recall, tuning)
    # the whitened copy (N x d float16, 1.3 GB at 1.28M x 512) is done with: freed before the copy rule's
    # workers fork, so none of them carries it
    del vecs
    target = recipe.precision_target
    # pictures compared once, whichever run of the rules asks; scores of earlier builds read from the store
    store = CopyScoreStore.load(build_dir / layout.COPY_SCORES) if recipe.copy_threshold is not None else None
    known: dict[str, Any] = {"store": store}
    if target is not None:
        keys = np.asarray(pq.read_table(build_dir / layout.INDEX, columns=["key"]).column("key").to_pylist(),
                          dtype=object)
        recipe, resolved = resolve_precision_target(recipe, build_dir, cand, n, digests, cats.ids, keys, target,
                                                    engine, known)
        del keys
    mined, duplicates = mine_without_copies(recipe, cand, n, digests, cats.ids, build_dir, engine, known)
    if store is not None and store.added:
        store.save(build_dir / layout.COPY_SCORES)
    if target is not None:
        mined.thresholds["min_similarity"].update(resolved)
    kept, funnel, mutual = mined.kept, mined.funnel, mined.mutual
    if len(kept) == 0:
        raise no_pairs_error(funnel, int(valid.sum()))

    table = pa.table({
        "pair_id": pa.array(np.arange(len(kept)), pa.int64()),
        "anchor_id": pa.array(ids[kept.anchor], pa.int64()),
        "positive_id": pa.array(ids[kept.positive], pa.int64()),
        "similarity": pa.array(kept.similarity, pa.float32()),
        "rank": pa.array(kept.rank, pa.int32()),
        "mutual": pa.array(mutual, pa.bool_()),
        "label": pa.array(labels[kept.anchor], pa.int32()),
        "label_name": index.column("label_name").take(pa.array(kept.anchor)),
        "positive_label": pa.array(labels[kept.positive], pa.int32()),
        "category": pa.array(cats.ids[kept.anchor], pa.int32()),
        "category_source": pa.array([cats.mode] * len(kept), pa.string()),
    }, schema=PAIRS_SCHEMA)
    stats = {
        "images": int(n), "searchable": int(valid.sum()), "excluded": int(excluded.sum()), "pairs": len(kept),
        "search": {**_search_summary(recipe, cats, plans, recall), **({"nprobe_tuning": tuning[:20]} if tuning else {})},
        "categories": {"mode": cats.mode, "count": len(groups), **cats.info},
        "funnel": funnel.steps,
        "thresholds": mined.thresholds,
        "whitening": whitening.describe(),
        "duplicates": {**duplicates, "removed": {step: funnel.removed().get(step, 0)
                                                 for step in ("near_duplicate", "same_picture")}},
        "similarity_range": {"candidates_p01_p99": [float(np.quantile(cand.similarity, 0.01)),
                                                    float(np.quantile(cand.similarity, 0.99))],
                             "pairs_p01_p99": [float(np.quantile(kept.similarity, 0.01)),
                                               float(np.quantile(kept.similarity, 0.99))]},
        "curve": threshold_curve(mined.candidates, recipe.max_per_anchor, labels, n,
                                 mined.thresholds["min_similarity"]["value"], within=mined.loose),
        "hist_bins": F.HIST_BINS.tolist(),
        "kept_hist": np.histogram(kept.similarity, F.HIST_BINS)[0].tolist(),
        "removed_hist": funnel.removed_hist,
    }
    write_json(build_dir / layout.MINE_STATS, stats)
    write_table(build_dir / layout.PAIRS, table)
    return {"pairs": len(kept)}
