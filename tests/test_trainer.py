"""The reference trainer: its losses on known inputs, every method x positive mode, resume, and evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_curate.backbones import build_backbone
from spp_curate.train.data import ViewMaker, pair_data
from spp_curate.train.evaluate import knn_top1, linear_top1
from spp_curate.train.losses import multi_positive_info_nce, view_masks
from spp_curate.train.loop import TrainConfig, load_checkpoint, train
from spp_curate.train.methods import METHODS, Views, build_method

from conftest import FMNIST, run_cli, run_cli_process


def test_info_nce_on_known_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0]])
    positives = torch.tensor([[False, True, False, False]])
    excluded = torch.tensor([[True, False, False, False]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(3)))
    assert multi_positive_info_nce(logits, positives, excluded).item() == pytest.approx(expected, rel=1e-6)
    # exclude column 3 (the partner, say): it no longer counts as a negative
    excluded[0, 3] = True
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    assert multi_positive_info_nce(logits, positives, excluded).item() == pytest.approx(expected, rel=1e-6)
    # two positives: the mean of their log-probabilities
    positives[0, 2] = True
    denominator = math.exp(2) + math.exp(1)
    expected = -(math.log(math.exp(2) / denominator) + math.log(math.exp(1) / denominator)) / 2
    assert multi_positive_info_nce(logits, positives, excluded).item() == pytest.approx(expected, rel=1e-6)
    # SupCon's L_in: the log of their mean probability
    expected_in = -math.log((math.exp(2) / denominator + math.exp(1) / denominator) / 2)
    assert multi_positive_info_nce(logits, positives, excluded, form="in").item() == pytest.approx(expected_in,
                                                                                                 rel=1e-6)
    # weighted: a soft target in proportion to the weights, in either form
    weights = torch.tensor([[0.0, 1.0, 0.25, 0.0]])
    p2, p1 = math.exp(2) / denominator, math.exp(1) / denominator
    assert multi_positive_info_nce(logits, positives, excluded, weights, form="in").item() == pytest.approx(
        -math.log((1.0 * p2 + 0.25 * p1) / 1.25), rel=1e-6)
    assert multi_positive_info_nce(logits, positives, excluded, weights).item() == pytest.approx(
        -(1.0 * math.log(p2) + 0.25 * math.log(p1)) / 1.25, rel=1e-6)
    # with a single positive the two forms are one loss (``augment`` is unchanged by the choice)
    positives[0, 2] = False
    assert multi_positive_info_nce(logits, positives, excluded, form="in").item() == pytest.approx(
        multi_positive_info_nce(logits, positives, excluded).item(), rel=1e-6)


def test_the_support_set_adds_each_views_nearest_partner_projection_as_a_positive():
    from spp_curate.train.support import SupportSet

    support = SupportSet(4, 3)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2]]), dim=1)
    logits, positives, excluded = z @ z.T / 0.5, torch.eye(2, dtype=torch.bool).logical_not(), torch.eye(2).bool()
    same = support.extend(z, logits, positives, excluded, None, None, 0.5)
    assert all(a is b for a, b in zip(same, (logits, positives, excluded, None)))  # empty: nothing added
    bank = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    support.push(bank)
    new_logits, new_pos, new_exc, weights = support.extend(z, logits, positives, excluded, None,
                                                           torch.tensor([1.0, 0.3]), 0.5)
    assert new_logits.shape == (2, 3) and new_pos[:, 2].all() and not new_exc[:, 2].any()
    # row 0's nearest entry is (1, 0, 0), row 1's (0, 1, 0)
    assert new_logits[:, 2].tolist() == pytest.approx([z[0, 0].item() / 0.5, z[1, 1].item() / 0.5], rel=1e-6)
    assert weights[:, 2].tolist() == pytest.approx([1.0, 0.3]) and weights[:, :2].tolist() == positives.float().tolist()
    # first in, first out: the oldest entries leave once the queue is full
    support.push(-bank[:2])
    assert int(support.filled) == 4 and torch.allclose(support.bank[0], -bank[1])
    assert torch.allclose(support.bank[1:3], bank[1:3]) and torch.allclose(support.bank[3], -bank[0])


def test_both_masks_the_partner_out_of_in_batch_negatives():
    # two pairs in a batch: (a=1, b=2) and (b=2, c=3); views stacked as [aug(a), aug'(a), aug(b)] x 2 pairs
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    image = torch.tensor([1, 2, 1, 2, 2, 3])
    partner = torch.tensor([2, 3, 2, 3, 1, 2])
    pos, exc = view_masks(group, image, partner, use_partner=True)
    # row 0 = aug(a) of pair 0: positives are aug'(a) and aug(b) of pair 0
    assert pos[0].tolist() == [False, False, True, False, True, False]
    # pair 1's views of image 2 (= a's partner) are neither positive nor negative
    assert exc[0].tolist() == [True, True, False, True, False, False]
    # augment mode uses no semantics: b's views elsewhere are plain negatives
    pos, exc = view_masks(group, image, partner, use_partner=False)
    assert pos[0].tolist() == [False, False, True, False, False, False]
    assert exc[0].tolist() == [True, False, False, False, False, False]


def test_the_grid_backbone_keeps_where_a_small_pictures_parts_are():
    """``small-cnn-grid`` pools the small CNN's channels to 2 x 2 cells: 512 features, and two pictures whose
    halves are swapped (the same parts elsewhere) get features far apart, where one global pool (``small-cnn``)
    gives the same features up to the borders' padding."""
    torch.manual_seed(0)
    grid, dim = build_backbone("small-cnn-grid", 32)
    single, single_dim = build_backbone("small-cnn", 32)
    single.load_state_dict(grid.state_dict())  # the same convolutions: only the pooling differs
    assert (dim, single_dim) == (512, 128)
    x = torch.zeros(1, 3, 32, 32)
    x[..., 4:12, 4:28] = 1.0  # a bar at the top
    swapped = torch.flip(x, dims=[2])  # the same bar at the bottom
    grid.eval(), single.eval()
    with torch.no_grad():
        g, s = grid(torch.cat([x, swapped])), single(torch.cat([x, swapped]))
    assert g.shape == (2, 512) and s.shape == (2, 128)
    cos = torch.nn.functional.cosine_similarity
    assert cos(g[:1], g[1:]).item() < cos(s[:1], s[1:]).item() - 0.05


def test_moco_masks_the_partner_out_of_the_queue():
    torch.manual_seed(0)
    backbone, dim = build_backbone("small-cnn", 32)
    moco = build_method("moco", backbone, dim, use_partner=True).eval()
    x = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    # four anchors that share one partner image (id 20), as a popular image does
    images = [torch.tensor([10, 11, 12, 13])] * 2 + [torch.tensor([20, 20, 20, 20])]
    partners = [torch.tensor([20, 20, 20, 20])] * 2 + [torch.tensor([10, 11, 12, 13])]
    moco.queue_ids[:8] = torch.tensor([20, 20, 20, 20, 99, 98, 97, 96])

    def loss_with(queue):
        moco.queue.copy_(queue)
        ptr = moco.queue_ptr.clone()
        value = moco.loss(Views(x, images, partners)).item()
        moco.queue_ptr.copy_(ptr)
        return value

    base = moco.queue.clone()
    partner_changed = base.clone()
    partner_changed[:4] = torch.nn.functional.normalize(torch.randn(4, 128), dim=1)
    other_changed = base.clone()
    other_changed[4:8] = torch.nn.functional.normalize(torch.randn(4, 128), dim=1)
    ids = moco.queue_ids.clone()
    reference = loss_with(base)
    moco.queue_ids.copy_(ids)
    assert loss_with(partner_changed) == pytest.approx(reference, rel=1e-5)
    moco.queue_ids.copy_(ids)
    assert loss_with(other_changed) != pytest.approx(reference, rel=1e-5)


@pytest.fixture(scope="module")
def pair_batches(label_build):
    data = pair_data(str(label_build / "release"), 32, workers=0, limit=32)
    torch.manual_seed(0)
    return {mode: ViewMaker(data, mode, 32, torch.device("cpu"))(torch.arange(len(data)))
            for mode in ("augment", "semantic", "both")}


def ten_steps(model, views) -> list[float]:
    """The losses of ten SGD steps on one batch of views. MoCo's queue fills with real keys as it trains, which
    makes its loss harder by design: the queue is held fixed so the steps show the encoder learning."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    queue = {k: v.clone() for k, v in model.named_buffers() if k.startswith("queue")}
    losses = []
    for step in range(10):
        for k, v in model.named_buffers():
            if k in queue:
                v.copy_(queue[k])
        loss = model.loss(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step / 10)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("positives", ["augment", "semantic", "both"])
def test_every_method_and_positive_mode_learns(pair_batches, method, positives):
    torch.manual_seed(0)
    backbone, dim = build_backbone("small-cnn", 32)
    model = build_method(method, backbone, dim, use_partner=positives != "augment")
    views = pair_batches[positives]
    assert len(views.tensors) == (3 if positives == "both" else 2)
    losses = ten_steps(model, views)
    assert np.mean(losses[-3:]) < losses[0], losses


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_contrastive_methods_with_l_in_and_a_support_set_learn(pair_batches, method):
    torch.manual_seed(0)
    backbone, dim = build_backbone("small-cnn", 32)
    model = build_method(method, backbone, dim, use_partner=True, positive_loss="in", support=64)
    losses = ten_steps(model, pair_batches["both"])
    assert int(model.support.filled) == 64  # the partner views of every step went in
    # the first step has no support positive yet; from the second on it does
    assert np.mean(losses[-3:]) < losses[1], losses


@pytest.mark.parametrize("options", [{}, {"positive_loss": "in", "support": 96}])
def test_resume_continues_the_same_run(label_build, tmp_path, options):
    resumed_equals_straight(label_build, tmp_path, options)


def resumed_equals_straight(label_build: Path, tmp_path: Path, options: dict) -> None:
    """A run stopped after one epoch and resumed ends with the weights and losses of a straight run
    (``tests/test_cuda.py`` runs it on the device)."""
    common = dict(pairs=str(label_build / "release"), method="simclr", positives="both", limit=256,
                  batch_size=64, epochs=2, seed=1, **options)
    train(TrainConfig(out=str(tmp_path / "straight"), **common))
    train(TrainConfig(out=str(tmp_path / "resumed"), **common), stop_after=1)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    train(TrainConfig(out=str(tmp_path / "resumed"), **common), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]])


def test_weighted_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    train_f = rng.normal(size=(300, 16)).astype(np.float32)
    train_f /= np.linalg.norm(train_f, axis=1, keepdims=True)
    test_f = rng.normal(size=(50, 16)).astype(np.float32)
    test_f /= np.linalg.norm(test_f, axis=1, keepdims=True)
    train_y = rng.integers(0, 4, 300)
    test_y = rng.integers(0, 4, 50)
    correct = 0
    for q, y in zip(test_f, test_y):
        sims = train_f @ q
        top = np.argsort(-sims)[:20]
        votes = np.zeros(4)
        for i in top:
            votes[train_y[i]] += math.exp(sims[i] / 0.1)
        correct += int(np.argmax(votes) == y)
    assert knn_top1(train_f, train_y, test_f, test_y, k=20, temperature=0.1) == correct / 50


def test_linear_probe_reads_features_crowded_at_one_direction():
    # SSL features after ReLU share one large direction; the class lies in small offsets around it.
    # Linearly separable, but on the L2-normalised features alone the probe's weight decay held it to 0.88.
    rng = np.random.default_rng(0)

    def features(n):
        y = rng.integers(0, 10, n)
        f = rng.normal(0.0, 0.01, (n, 32))
        f[:, 0] += 3.0
        f[np.arange(n), 1 + y] += 0.06
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), y

    (train_f, train_y), (test_f, test_y) = features(2000), features(1000)
    assert linear_top1(train_f, train_y, test_f, test_y) > 0.98
    # and chance stays chance: labels unrelated to the features
    assert linear_top1(train_f, rng.permutation(train_y), test_f, test_y) < 0.2


def test_train_eval_and_reuse_as_encoder(label_build, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--out", run, "--pairs", label_build / "release", "--method", "byol",
                   "--positives", "semantic", "--epochs", "1", "--limit", "256", "--batch-size", "64") == 0
    assert run_cli("eval", run, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "500") == 0
    result = json.loads((run / "eval.json").read_text())
    assert 0.1 < result["knn_top1"] <= 1 and 0.1 < result["linear_top1"] <= 1
    # the raw-pixel reference of the same split: Fashion-MNIST pixels alone classify far above chance
    assert 0.5 < result["pixel_1nn_top1"] <= 1 and 0.5 < result["pixel_knn_top1"] <= 1
    assert 0.5 < result["pixel_linear_top1"] <= 1
    # several k at once; the pixel references are read from where the first eval kept them
    proc = run_cli_process("eval", run, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "500",
                           "--k", "20", "--k", "200", env={"SPP_CURATE_PROGRESS": "plain"})
    assert proc.returncode == 0, proc.stderr
    again = json.loads((run / "eval.json").read_text())
    assert set(again["knn_top1_at"]) == {"20", "200"} and again["knn_top1"] == again["knn_top1_at"]["20"]
    assert again["knn_top1_at"]["200"] == result["knn_top1"] and again["linear_top1"] == result["linear_top1"]
    assert "k=20" in proc.stdout and "eval: kNN (k=20, 200): done in" in proc.stderr + proc.stdout
    assert "eval: linear probe" in proc.stderr + proc.stdout  # every phase says where it is
    assert "raw-pixel probe" not in proc.stderr + proc.stdout  # kept from the first eval: not fitted again
    assert again["pixel_linear_top1"] == result["pixel_linear_top1"]
    assert again["pixel_knn_top1_at"]["200"] == result["pixel_knn_top1"]
    out = tmp_path / "b"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "300",
                   "--encoder", f"ssl:{run / 'last.pt'}", "--category", "none", "--min-similarity", "0",
                   "--dup-threshold", "0.9999", "--workers", "0") == 0
    meta = json.loads((out / "embeddings" / "meta.json").read_text())
    # the default backbone, small-cnn-grid: 128 channels pooled to 2 x 2 cells
    assert meta["model"]["output"] == "backbone (pre-projector)" and meta["dim"] == 512
    # embedded at the size the checkpoint was trained at, not the manifest's size for its own encoder (64)
    assert meta["model"]["image_size"] == 32


def test_train_single_images_gives_the_sampler(tmp_path):
    assert run_cli("train", "--out", tmp_path / "s", "--source", "fashion-mnist", "--root", FMNIST,
                   "--method", "simclr", "--epochs", "1", "--limit", "256", "--batch-size", "64") == 0
    assert (tmp_path / "s" / "last.pt").exists()


@pytest.mark.parametrize("args, option", [(["--method", "dino"], "--method"), (["--positives", "all"], "--positives"),
                                          (["--backbone", "vit"], "--backbone")])
def test_train_wrong_option_is_one_line(label_build, tmp_path, args, option):
    proc = run_cli_process("train", "--out", tmp_path / "r", "--pairs", label_build / "release", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert option in proc.stderr.strip().splitlines()[-1]


def test_a_checkpoint_encoder_is_embedded_at_its_own_size_unless_told():
    from spp_curate.config import resolve_recipe

    assert resolve_recipe("fashion-mnist", {}).image_size == 64  # the manifest's size, for its own encoder
    assert resolve_recipe("fashion-mnist", {"encoder": "ssl:run/last.pt"}).image_size is None  # the checkpoint's
    assert resolve_recipe("fashion-mnist", {"encoder": "ssl:run/last.pt", "image_size": 48}).image_size == 48
    assert resolve_recipe("fashion-mnist", {"encoder": "openclip:ViT-B-32"}).image_size == 64
