"""Evaluation of a run's backbone: weighted kNN (k=200, T=0.1) and a linear probe, BatchNorm in eval mode,
with the raw-pixel kNN, 1-NN and linear probe of the same split as the reference lines."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import parse_source
from ..curate.sources import open_named
from ..devices import autocast_for, default_device
from ..errors import UserError
from ..files import write_json
from ..progress import stage_progress
from ..checkpoint import load_backbone
from .augment import normalise
from .cache import CACHE_DIR, SourceReader, decode_into


@torch.no_grad()
def extract(backbone: torch.nn.Module, source, image_size: int, limit: int | None = None,
            batch: int | None = None, workers: int | None = None, spill_dir: Path | None = None,
            label: str = "eval") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised backbone features, L2-normalised raw pixels (the eval transform's input to the backbone,
    flattened, float16) and labels of a source's images; those that do not load are left out.

    The pictures are decoded once by ``workers`` processes into the cache the trainer uses (same geometry
    as the eval transform); features are computed on the device in batches of ``batch`` (1,024 on a GPU).
    """
    device = default_device()
    backbone = backbone.to(device).to(memory_format=torch.channels_last).eval()  # BatchNorm from training
    batch = batch or (1024 if device.type == "cuda" else 256)
    items = list(itertools.islice(source.items(), limit))
    cache = decode_into(SourceReader(source, [k for k, _ in items]), image_size, workers, spill_dir=spill_dir,
                        label=f"{label}: decode")
    kept = np.flatnonzero(cache.ok)
    if not len(kept):
        raise UserError("no image of this split could be loaded", option="--source")
    labels = np.asarray([items[i][1] for i in kept])
    feats, pixels = [], []
    with stage_progress(f"{label}: features", len(kept)) as (bar, task):
        for lo in range(0, len(kept), batch):
            x = normalise(torch.from_numpy(cache.pixels[kept[lo: lo + batch]]).to(device))
            with autocast_for(device):
                f = backbone(x)
            feats.append(torch.nn.functional.normalize(f.float(), dim=1).cpu().numpy())
            pixels.append(torch.nn.functional.normalize(x.flatten(1), dim=1).half().cpu().numpy())
            bar.update(task, advance=len(x))
    return np.concatenate(feats), np.concatenate(pixels), labels


def knn_top1(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
             k: int = 200, temperature: float = 0.1, batch: int = 1024) -> float:
    """Weighted kNN (Wu et al., 2018): each of the k nearest votes for its class with exp(sim / T)."""
    return knn_accuracies(train_f, train_y, test_f, test_y, (k,), temperature, batch)[0]


def knn_accuracies(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                   ks: tuple[int, ...], temperature: float = 0.1, batch: int = 1024) -> list[float]:
    """:func:`knn_top1` for each k in ``ks``, from one similarity product per batch of test rows."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    ks = [min(k, len(train_f)) for k in ks]
    correct = [0] * len(ks)
    device = default_device()
    labels = torch.from_numpy(train_y).to(device)
    train_t = torch.from_numpy(train_f).to(device)
    test_t, test_l = torch.from_numpy(test_f).to(device), torch.from_numpy(test_y).to(device)
    for lo in range(0, len(test_f), batch):
        sims = test_t[lo: lo + batch] @ train_t.T
        top, idx = sims.topk(max(ks), dim=1)  # sorted: the first k columns are the k nearest
        weights, votes_for = (top / temperature).exp(), labels[idx].long()
        for j, k in enumerate(ks):
            votes = torch.zeros(len(top), classes, device=device).scatter_add_(1, votes_for[:, :k], weights[:, :k])
            correct[j] += int((votes.argmax(1) == test_l[lo: lo + batch]).sum())
    return [c / len(test_f) for c in correct]


def linear_top1(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                iterations: int = 300, seed: int = 0) -> float:
    """A linear classifier on frozen features (full-batch L-BFGS to convergence, light weight decay).

    The features are first standardised by the training split's mean and standard deviation per dimension
    (a BatchNorm without affine parameters, as in MAE's linear probe). On the L2-normalised features alone
    the weight decay caps the logits' scale: that probe converged 8-9 points lower (0.75 against 0.84 on
    the ``make demo`` runs, BENCHMARKS.md) and measured the penalty more than the features.
    """
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    device = default_device()
    mean = train_f.mean(axis=0, dtype=np.float64)
    std = train_f.std(axis=0, dtype=np.float64) + 1e-6
    train_f = ((train_f - mean) / std).astype(np.float32)
    test_f = ((test_f - mean) / std).astype(np.float32)
    x, y = torch.from_numpy(train_f).to(device), torch.from_numpy(train_y).long().to(device)
    probe = torch.nn.Linear(x.shape[1], classes).to(device)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iterations, history_size=20)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = probe(torch.from_numpy(test_f).to(device)).argmax(1).cpu().numpy()
    return float((pred == test_y).mean())


_PIXEL_REFERENCES: dict[str, dict[str, float]] = {}


def pixel_references(train_px: np.ndarray, train_y: np.ndarray, test_px: np.ndarray,
                     test_y: np.ndarray) -> dict[str, float]:
    """The references every result is read against: the same kNN, 1-NN and linear probe on the raw pixels of
    the split. They depend on the pictures alone, so runs evaluated on the same split in one process (the
    demo's, a benchmark's seeds) reuse them: the pixel probe is the slow part of an evaluation."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (train_px, train_y, test_px, test_y):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    key = digest.hexdigest()
    if key not in _PIXEL_REFERENCES:
        train_px, test_px = train_px.astype(np.float32), test_px.astype(np.float32)
        knn, one = knn_accuracies(train_px, train_y, test_px, test_y, (200, 1))
        _PIXEL_REFERENCES[key] = {"pixel_knn_top1": knn, "pixel_1nn_top1": one,
                                  "pixel_linear_top1": linear_top1(train_px, train_y, test_px, test_y)}
    return dict(_PIXEL_REFERENCES[key])


def evaluate(run: Path, source: str, root: str | None, test_root: str | None = None,
             limit: int | None = None) -> dict[str, Any]:
    """kNN and linear top-1 on the source's train/test split; writes ``RUN/eval.json``."""
    backbone, _, image_size = load_backbone(run)
    kind = parse_source(source).kind
    if kind == "fashion-mnist":
        train_src, test_src = open_named(source, root, "train"), open_named(source, root, "test")
    elif test_root:
        train_src, test_src = open_named(source, root), open_named(source, test_root)
    else:
        raise UserError("this source needs --test-root for the test split (--root is the train split)",
                        option="--test-root")
    spill = Path(run) / CACHE_DIR
    train_f, train_px, train_y = extract(backbone, train_src, image_size, limit, spill_dir=spill, label="eval train")
    test_f, test_px, test_y = extract(backbone, test_src, image_size, limit, spill_dir=spill, label="eval test")
    result = {"knn_top1": knn_top1(train_f, train_y, test_f, test_y),
              "linear_top1": linear_top1(train_f, train_y, test_f, test_y),
              **pixel_references(train_px, train_y, test_px, test_y),
              "train_images": len(train_y), "test_images": len(test_y), "knn_k": 200, "knn_t": 0.1,
              "linear_probe": "standardised features, L-BFGS"}
    write_json(run / "eval.json", result)
    return result
