"""Semantic positives weighted by how trustworthy the pairs are: the loss, the release's precision, what `train` says."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from spp_curate.backbones import build_backbone
from spp_curate.train.data import ViewMaker, pair_data
from spp_curate.train.losses import multi_positive_info_nce, view_masks
from spp_curate.train.methods import METHODS, Views, build_method
from spp_curate.train.trust import release_trust, weight_for


def test_weighted_info_nce_on_known_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0], [1.0, 0.0, 2.0, 0.5]])
    positives = torch.tensor([[False, True, True, False], [False, False, True, False]])
    excluded = torch.tensor([[True, False, False, False], [False, True, False, False]])
    weights = torch.tensor([[0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.5, 0.0]])

    def log_p(row, col):
        keep = [k for k in range(4) if not excluded[row, k]]
        return logits[row, col].item() - math.log(sum(math.exp(logits[row, k].item()) for k in keep))

    row0 = -(1.0 * log_p(0, 1) + 0.5 * log_p(0, 2)) / 1.5  # a soft target in proportion to the weights
    row1 = -log_p(1, 2)
    expected = (1.0 * row0 + 0.5 * row1) / 1.5  # each row counts by its strongest positive's weight
    got = multi_positive_info_nce(logits, positives, excluded, weights).item()
    assert got == pytest.approx(expected, rel=1e-6)
    ones = torch.ones_like(weights)
    assert multi_positive_info_nce(logits, positives, excluded, ones).item() == pytest.approx(
        multi_positive_info_nce(logits, positives, excluded).item(), rel=1e-6)


@pytest.fixture(scope="module")
def both_views(label_build):
    data = pair_data(str(label_build / "release"), 32, workers=0, limit=24)
    torch.manual_seed(0)
    return ViewMaker(data, "both", 32, torch.device("cpu"))(torch.arange(len(data)))


def _loss(model, views):
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # MoCo's queue moves on every loss
    torch.manual_seed(0)
    value = model.loss(views)
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    return value.item()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_weight_of_one_is_the_unweighted_loss_and_others_change_it(both_views, method):
    torch.manual_seed(0)
    backbone, dim = build_backbone("small-cnn", 32)
    model = build_method(method, backbone, dim, use_partner=True)
    b = both_views.batch

    def with_weight(w):
        return Views(both_views.tensors, both_views.images, both_views.partners, torch.full((b,), w))

    plain = _loss(model, both_views)
    assert _loss(model, with_weight(1.0)) == pytest.approx(plain, rel=1e-5)
    assert _loss(model, with_weight(0.3)) != pytest.approx(plain, rel=1e-4)
    assert math.isfinite(_loss(model, with_weight(0.0)))


def test_a_zero_weight_keeps_the_augmented_positive_and_makes_the_partner_a_plain_negative(both_views):
    torch.manual_seed(0)
    backbone, dim = build_backbone("small-cnn", 32)
    model = build_method("simclr", backbone, dim, use_partner=True).eval()
    with torch.no_grad():
        x, group, image, partner = both_views.stacked()
        z = torch.nn.functional.normalize(model.projector(model.backbone(x)), dim=1)
        logits = z @ z.T / model.temperature
        positives, excluded = view_masks(group, image, partner, use_partner=True)
        same_image = image[:, None] == image[None, :]
        # the anchor's rows (its two augmentations): each other's only positive, the untrusted partner's view a
        # negative like any other image's; the partner's rows drop out
        anchor_rows = slice(0, 2 * both_views.batch)
        expected = multi_positive_info_nce(logits[anchor_rows], (positives & same_image)[anchor_rows],
                                           excluded[anchor_rows]).item()
        zero = Views(both_views.tensors, both_views.images, both_views.partners, torch.zeros(both_views.batch))
        assert model.loss(zero).item() == pytest.approx(expected, rel=1e-5)
        assert model.loss(both_views).item() != pytest.approx(expected, rel=1e-4)


def test_the_weight_is_the_precision_above_chance():
    assert weight_for(1.0, 0.1) == 1.0
    assert weight_for(0.1, 0.1) == 0.0
    assert weight_for(0.05, 0.1) == 0.0
    assert weight_for(0.55, 0.1) == pytest.approx(0.5)
    assert weight_for(0.7, 0.0) == pytest.approx(0.7)


def _with_manifest(release, tmp_path, change):
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_release_trust_reads_the_reviewed_estimate_then_the_labels_and_ignores_odd_values(label_build, none_build,
                                                                                         tmp_path):
    labelled = release_trust(str(label_build / "release"), None)
    assert (labelled.precision, labelled.source, labelled.weight) == (1.0, "labels", 1.0)
    assert labelled.chance == pytest.approx(0.1) and labelled.warning() is None
    mined = json.loads((none_build / "release" / "manifest.json").read_text())["metrics"]["precision"]
    sampler = release_trust(str(none_build / "release"), None)
    assert sampler.precision == pytest.approx(mined) and sampler.weight == pytest.approx(weight_for(mined, 0.1))

    def reviewed(m):
        m["review"] = {"precision_estimate": {"value": 0.3, "low": 0.2, "high": 0.4}}
    est = release_trust(str(_with_manifest(label_build / "release", tmp_path / "a", reviewed)), None)
    assert (est.precision, est.source) == (0.3, "reviewed sample")
    assert est.weight == pytest.approx((0.3 - 0.1) / 0.9) and "many of these pairs are of two classes" in est.warning() and "times the" in est.warning()

    for odd in ("1.0", 5.0, float("nan"), True, None, [1]):
        def hostile(m, odd=odd):
            m["metrics"]["precision"] = odd
            m["review"] = {"precision_estimate": "high", "precision_released": -1}
        trust = release_trust(str(_with_manifest(label_build / "release", tmp_path / str(id(odd)), hostile)), None)
        assert (trust.precision, trust.source, trust.weight) == (None, "unknown", 1.0), odd
        assert "unknown" in trust.warning()
    given = release_trust(str(label_build / "release"), 0.25)
    assert (given.source, given.weight, given.warning()) == ("given", 0.25, None)


def test_train_says_when_pairs_are_close_to_random_and_weights_them(label_build, tmp_path, cli):
    def near_random(m):
        m["metrics"]["precision"] = 0.12
    release = _with_manifest(label_build / "release", tmp_path / "r", near_random)
    run = tmp_path / "run"
    proc = cli("train", "--out", run, "--pairs", release, "--positives", "both", "--epochs", "1", "--limit", "64",
               "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "pair precision 0.120 (labels" in said and "most of these pairs are of two classes" in said
    weight = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["partner_weight"]
    assert weight == pytest.approx((0.12 - 0.1) / 0.9)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "half", "inf"])
def test_a_wrong_partner_weight_is_one_line(label_build, tmp_path, cli, value):
    proc = cli("train", "--out", tmp_path / "r", "--pairs", label_build / "release", "--positives", "both",
               "--partner-weight", value)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "--partner-weight" in last and "auto, or a number from 0 to 1" in last


def test_a_release_carries_its_precision_by_similarity_band_from_the_labels(none_build):
    import numpy as np
    import pyarrow.parquet as pq

    from spp_curate.review.estimate import bands_of

    manifest = json.loads((none_build / "release" / "manifest.json").read_text())
    trust = manifest["pair_trust"]
    pairs = pq.read_table(none_build / "pairs.parquet").to_pandas()
    band = bands_of(pairs.similarity.to_numpy())
    agree = (pairs.label == pairs.positive_label).to_numpy()
    assert trust["source"] == "labels"
    assert [b["pairs"] for b in trust["bands"]] == np.bincount(band, minlength=5).tolist()
    for h, b in enumerate(trust["bands"]):
        assert b["precision"] == pytest.approx(agree[band == h].mean())
    # the mean over bands, by their pairs, is the release's precision
    shares = np.asarray([b["pairs"] for b in trust["bands"]]) / len(pairs)
    assert float(np.sum(shares * [b["precision"] for b in trust["bands"]])) == pytest.approx(
        manifest["metrics"]["precision"])
    card = (none_build / "release" / "README.md").read_text()
    assert "Precision by similarity band (labels" in card
    assert f"{trust['cuts'][-1]:.3f} and up | {trust['bands'][-1]['pairs']:,} | " \
        f"{trust['bands'][-1]['precision']:.3f} |" in card


def test_similarity_trust_weights_each_pair_by_its_band_and_train_uses_them(none_build, tmp_path, cli):
    import numpy as np

    release = str(none_build / "release")
    one = release_trust(release, None)
    banded = release_trust(release, None, "similarity")
    assert one.bands is None and one.pair_weights(np.array([0.5])) is None
    data = pair_data(release, 32, workers=0)
    weights = banded.pair_weights(data.similarity)
    cuts, bands = banded.bands["cuts"], banded.bands["bands"]
    for s, w in zip(data.similarity[:200], weights[:200]):
        h = sum(s >= c for c in cuts)
        assert w == pytest.approx(weight_for(bands[h]["precision"], banded.chance))
    assert len(set(np.round(weights, 6))) > 1  # the bands differ on these pairs
    # a batch's views carry the weights of its own rows
    views = ViewMaker(data, "both", 32, torch.device("cpu"), pair_weights=weights)(torch.arange(7, 19))
    assert torch.allclose(views.weights, torch.from_numpy(weights[7:19]).float())

    run = tmp_path / "run"
    proc = cli("train", "--out", run, "--pairs", release, "--positives", "both", "--partner-trust", "similarity",
               "--epochs", "1", "--limit", "96", "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "by similarity band (labels)" in " ".join(proc.stderr.split())
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["partner_weight"]
    first = pair_data(release, 32, workers=0, limit=96)
    assert logged == pytest.approx(float(banded.pair_weights(first.similarity).mean()))


@pytest.mark.parametrize("odd", [
    "high", {"source": "labels", "cuts": [0.1, 0.2], "bands": []},
    {"source": "labels", "cuts": [0.4, 0.3, 0.5, 0.6], "bands": [{"pairs": 1, "judged": 1, "precision": 0.5}] * 5},
    {"source": "labels", "cuts": [0.1, 0.2, 0.3, 0.4], "bands": [{"pairs": 1, "judged": 1, "precision": 1.5}] * 5},
    {"source": "me", "cuts": [0.1, 0.2, 0.3, 0.4], "bands": [{"pairs": 1, "judged": 1, "precision": 0.5}] * 5},
    {"source": "labels", "cuts": [0.1, float("nan"), 0.3, 0.4],
     "bands": [{"pairs": 1, "judged": 1, "precision": 0.5}] * 5}])
def test_an_odd_band_table_is_ignored_and_train_says_it_weighs_by_one_weight(none_build, tmp_path, cli, odd):
    def change(m):
        m["pair_trust"] = odd
    release = _with_manifest(none_build / "release", tmp_path / "r", change)
    trust = release_trust(str(release), None, "similarity")
    assert trust.bands is None and trust.precision is not None
    proc = cli("train", "--out", tmp_path / "run", "--pairs", release, "--positives", "both", "--partner-trust",
               "similarity", "--epochs", "1", "--limit", "64", "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "no precision by similarity band" in " ".join(proc.stderr.split())


def test_a_wrong_partner_trust_is_one_line(label_build, tmp_path, cli):
    proc = cli("train", "--out", tmp_path / "r", "--pairs", label_build / "release", "--positives", "both",
               "--partner-trust", "rank")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "--partner-trust" in last and "release, similarity" in last
