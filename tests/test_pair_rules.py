"""The pair rules, on hand-checked cases and on real mined pairs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import yaml

from conftest import FMNIST, TEST_ENCODER, run_cli

from spp_curate.pairing import filters as F
from spp_curate.engine.local import LocalEngine
from spp_curate.pairing.mine import raw_candidates


def _cand(rows):
    a, p, s, r = (np.asarray(x) for x in zip(*rows))
    return F.Candidates(a.astype(np.int64), p.astype(np.int64), s.astype(np.float32), r.astype(np.int32))


def test_top_per_anchor_keeps_best_ranks():
    c = _cand([(0, 1, .9, 1), (0, 2, .8, 2), (0, 3, .7, 3), (1, 0, .9, 1), (2, 3, .6, 2), (2, 0, .8, 1)])
    keep = F.top_per_anchor(c, 2)
    assert keep.tolist() == [True, True, False, True, True, True]
    assert F.top_per_anchor(c, 1).tolist() == [True, False, False, True, False, True]


def test_top_per_anchor_by_rank_levels_equals_the_sort_within_a_mask():
    """The rank-at-a-time keep (a count per anchor, no sort of the N x k candidates) keeps what sorting every
    anchor's candidates by rank keeps, nearest and farthest, within a mask or not; an anchor holding one rank
    twice is left to the sort."""
    def by_sort(c, cap, farthest, within):
        keep = np.zeros(len(c), bool)
        rows = np.flatnonzero(within)
        key = -c.rank[rows].astype(np.int64) if farthest else c.rank[rows]
        order = rows[np.lexsort((key, c.anchor[rows]))]
        seen: dict = {}
        for i in order:
            if seen.get(c.anchor[i], 0) < cap:
                keep[i] = True
                seen[c.anchor[i]] = seen.get(c.anchor[i], 0) + 1
        return keep

    rng = np.random.default_rng(0)
    for trial in range(20):
        n, k = 50, 6
        anchor = np.repeat(np.arange(n), k)
        rank = np.tile(np.arange(1, k + 1), n)
        drop = rng.random(len(anchor)) < 0.3  # candidates other rules removed
        shuffle = rng.permutation(int((~drop).sum()))
        c = F.Candidates(anchor[~drop][shuffle], rng.integers(0, n, int((~drop).sum())),
                         rng.random(int((~drop).sum())).astype(np.float32), rank[~drop][shuffle].astype(np.int32))
        within = rng.random(len(c)) < 0.8
        for cap in (1, 2, 3):
            for farthest in (False, True):
                partner = "farthest" if farthest else "nearest"
                assert (F.top_per_anchor(c, cap, partner, within=within) == by_sort(c, cap, farthest, within)).all()
                assert (F.top_per_anchor(c, cap, partner) == by_sort(c, cap, farthest, np.ones(len(c), bool))).all()
    twice = _cand([(0, 1, .9, 1), (0, 2, .8, 1), (0, 3, .7, 2)])
    assert F.top_per_anchor(twice, 1).tolist() == [True, False, False]


def test_partner_choice_takes_the_nearest_a_seeded_draw_or_the_farthest():
    c = _cand([(0, 1, .9, 1), (0, 2, .8, 2), (0, 3, .7, 3), (0, 4, .6, 4), (1, 0, .9, 1), (1, 2, .5, 2)])
    assert F.top_per_anchor(c, 1, "farthest").tolist() == [False, False, False, True, False, True]
    assert F.top_per_anchor(c, 2, "farthest").tolist() == [False, False, True, True, True, True]
    draws = [F.top_per_anchor(c, 1, "random", seed) for seed in range(20)]
    assert all(d.sum() == 2 and d[:4].sum() == 1 for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the seed moves the draw
    assert (F.top_per_anchor(c, 1, "random", 3) == draws[3]).all()  # and fixes it


def test_unordered_pairs_appear_once_keeping_the_better_ranked_direction():
    c = _cand([(0, 1, .9, 2), (1, 0, .9, 1), (2, 3, .5, 1), (3, 2, .5, 1), (0, 2, .4, 3)])
    keep = F.first_of_unordered(c)
    # {0,1}: rank 1 (anchor 1) wins; {2,3}: tie on rank, lower anchor (2) wins; {0,2} alone.
    assert keep.tolist() == [False, True, True, False, True]


def test_mutual_needs_the_reverse_neighbour():
    c = _cand([(0, 1, .9, 1), (1, 0, .9, 1), (2, 0, .8, 1)])
    codes = np.sort(F.pair_codes(c.anchor, c.positive, 3))
    assert F.is_mutual(c, codes, 3).tolist() == [True, True, False]


def test_near_duplicates_by_similarity_or_identical_bytes():
    c = _cand([(0, 1, .99, 1), (0, 2, .5, 2), (1, 2, .5, 1)])
    digests = np.array(["a", "b", "a"], dtype=object)
    assert F.not_near_duplicate(c, 0.98, digests).tolist() == [False, False, True]


def test_raw_candidates_exclude_self_and_rank_from_one():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    c = raw_candidates(v, [np.arange(50)], 5, LocalEngine())
    assert len(c) == 50 * 5
    assert not np.any(c.anchor == c.positive)
    brute = v @ v.T
    np.fill_diagonal(brute, -np.inf)
    for a in (0, 17, 49):
        mine = c.positive[c.anchor == a][np.argsort(c.rank[c.anchor == a])]
        assert mine.tolist() == np.argsort(-brute[a])[:5].tolist()
        assert sorted(c.rank[c.anchor == a].tolist()) == [1, 2, 3, 4, 5]


def test_raw_candidates_stay_within_their_group():
    v = np.eye(6, dtype=np.float32)[[0, 0, 1, 1, 2, 2]] + 0.01
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    groups = [np.array([0, 2, 4]), np.array([1, 3, 5])]
    c = raw_candidates(v, groups, 2, LocalEngine())
    group_of = np.array([0, 1, 0, 1, 0, 1])
    assert np.all(group_of[c.anchor] == group_of[c.positive])


def _check_rules(build):
    recipe = yaml.safe_load((build / "build.yaml").read_text())["recipe"]
    pairs = pq.read_table(build / "pairs.parquet").to_pandas()
    index = pq.read_table(build / "index.parquet").to_pandas().set_index("id")
    assert len(pairs) > 0
    assert (pairs.anchor_id != pairs.positive_id).all()
    lo = np.minimum(pairs.anchor_id, pairs.positive_id)
    hi = np.maximum(pairs.anchor_id, pairs.positive_id)
    codes = lo.to_numpy().astype(np.int64) * len(index) + hi.to_numpy()
    assert len(np.unique(codes)) == len(codes)
    thresholds = json.loads((build / "mine_stats.json").read_text())["thresholds"]  # quantiles resolved
    assert (pairs.similarity >= thresholds["min_similarity"]["value"]).all()
    if recipe["dup_threshold"] is not None:
        assert (pairs.similarity < thresholds["dup_threshold"]["value"]).all()
    assert (index.loc[pairs.anchor_id, "digest"].to_numpy() != index.loc[pairs.positive_id, "digest"].to_numpy()).all()
    assert pairs.groupby("anchor_id").size().max() <= recipe["max_per_anchor"]
    assert (pairs["rank"] >= 1).all() and (pairs["rank"] <= recipe["k"]).all()
    return pairs, index


def test_label_pairs_follow_every_rule_and_have_precision_one(label_build):
    pairs, index = _check_rules(label_build)
    assert (index.loc[pairs.anchor_id, "label"].to_numpy() == index.loc[pairs.positive_id, "label"].to_numpy()).all()
    metrics = json.loads((label_build / "report" / "metrics.json").read_text())
    assert metrics["precision"] == 1.0
    assert metrics["pairs"] == len(pairs)
    in_pairs = len(set(pairs.anchor_id) | set(pairs.positive_id))
    assert metrics["coverage"] == in_pairs / len(index)
    assert set(metrics["filter_removed"]) >= {"below_min_similarity", "near_duplicate", "same_picture",
                                               "anchor_cap", "unordered_duplicate"}


def test_category_none_measures_precision_below_one(none_build):
    pairs, index = _check_rules(none_build)
    agree = index.loc[pairs.anchor_id, "label"].to_numpy() == index.loc[pairs.positive_id, "label"].to_numpy()
    metrics = json.loads((none_build / "report" / "metrics.json").read_text())
    assert 0.1 < metrics["precision"] < 1.0
    assert abs(metrics["precision"] - agree.mean()) < 1e-9
    assert (pairs.category_source == "none").all()


def test_mutual_pairs_are_a_subset(tmp_path, label_build):
    out = tmp_path / "mutual"
    shutil.copytree(label_build, out)
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--shard-size", "1MB", "--category", "label", "--mutual") == 0
    pairs = pq.read_table(out / "pairs.parquet").to_pandas()
    assert pairs.mutual.all()
    funnel = json.loads((out / "report" / "metrics.json").read_text())["filter_removed"]
    assert funnel["not_mutual"] > 0


def test_exact_search_through_torch_finds_what_faiss_finds(none_build):
    """The exact search a GPU machine with faiss-cpu uses (torch, blockwise, partial top-k), run on the CPU
    with blocks small enough to merge many times, against faiss on the build's real embeddings."""
    from spp_curate.layout import load_embeddings
    from spp_curate.pairing.knn import SearchPlan, plan_search, torch_knn

    vecs, _ = load_embeddings(none_build, dtype=np.float16)
    sims, pos = torch_knn(vecs, 9, "cpu", query_batch=700, column_block=450)
    flat = raw_candidates(vecs, [np.arange(len(vecs))], 8, LocalEngine(), [SearchPlan("flat")])
    on_torch = raw_candidates(vecs, [np.arange(len(vecs))], 8, LocalEngine(),
                              [SearchPlan("flat", device="cpu", backend="torch")])
    assert np.array_equal(flat.anchor, on_torch.anchor)
    assert np.abs(flat.similarity - on_torch.similarity).max() < 1e-5
    # the same neighbours, up to the order of equal similarities
    same = np.mean(flat.positive == on_torch.positive)
    assert same > 0.99, same
    assert np.all(np.diff(sims, axis=1) <= 0) and np.all(sims[:, 0] > 0.999)  # each row finds itself

    plan = plan_search(1_000_000, 512, 8 * 10**9, cuda=True)
    assert (plan.kind, plan.backend, plan.device) == ("flat", "torch", "cuda")
    assert plan_search(1_000_000, 512, 8 * 10**9, cuda=False).kind == "ivf-flat"


def test_farthest_partners_are_less_similar_and_keep_the_nearest_prints(tmp_path, label_build):
    out = tmp_path / "farthest"
    shutil.copytree(label_build, out)
    before = (out / "embeddings").stat().st_mtime_ns
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, *TEST_ENCODER,
                   "--workers", "0", "--shard-size", "1MB", "--category", "label", "--partner", "farthest") == 0
    assert (out / "embeddings").stat().st_mtime_ns == before  # only the mine stage and after ran again
    near, far = (pq.read_table(b / "pairs.parquet").to_pandas() for b in (label_build, out))
    assert far.similarity.mean() < near.similarity.mean() and far["rank"].mean() > near["rank"].mean()
    _check_rules(out)
    assert "the least similar that pass" in (out / "report" / "index.html").read_text()


def test_the_histogram_threshold_labels_stay_inside_the_picture(none_build):
    """The report's similarity histogram names each threshold line beside it; wherever the line falls in the
    window (its left edge, the middle, its right edge), the label is drawn whole inside the plot's frame."""
    from spp_curate.pairing.quality import similarity_histogram_figure

    stats = json.loads((none_build / "mine_stats.json").read_text())
    fig = similarity_histogram_figure(stats)
    lo, hi = fig.axes[0].get_xlim()
    import matplotlib.pyplot as plt

    plt.close(fig)
    for share in (0.0, 0.5, 0.999):
        x = lo + share * (hi - lo)
        stats["thresholds"]["min_similarity"]["value"] = x
        stats["thresholds"]["dup_threshold"]["value"] = min(x + 0.001 * (hi - lo), hi)
        fig = similarity_histogram_figure(stats)
        renderer = fig.canvas.get_renderer()
        frame = fig.axes[0].get_window_extent(renderer)  # inside the axes: over no title, tick or edge
        labels = [t for t in fig.axes[0].texts if t.get_text() in ("min similarity", "duplicate threshold")]
        assert len(labels) == 2, [t.get_text() for t in fig.axes[0].texts]
        for label in labels:
            box = label.get_window_extent(renderer)
            assert (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                    and box.y1 <= frame.y1), (share, label.get_text(), box, frame)
        plt.close(fig)
