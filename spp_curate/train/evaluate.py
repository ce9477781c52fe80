"""Evaluation of a run's backbone: weighted kNN (k=200, T=0.1) and a linear probe, BatchNorm in eval mode,
with the raw-pixel kNN, 1-NN and linear probe of the same split as the reference lines."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
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
                iterations: int = 300, seed: int = 0, label: str | None = None) -> float:
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

    with stage_progress(label or "linear probe", iterations, unit="step") as (bar, task):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-4 * probe.weight.pow(2).sum()
            loss.backward()
            bar.update(task, advance=1)
            return loss

        opt.step(closure)
    with torch.no_grad():
        pred = probe(torch.from_numpy(test_f).to(device)).argmax(1).cpu().numpy()
    return float((pred == test_y).mean())


_PIXEL_REFERENCES: dict[str, dict[str, float]] = {}
#: The version of what a cached pixel reference holds (a change of the probe or the kNN makes new ones).
PIXEL_REFERENCE_VERSION = "2"


def pixel_reference_dir() -> Path:
    """Where pixel references are kept between runs (``SPP_CURATE_CACHE``, else ``~/.cache/spp-curate``)."""
    return Path(os.environ.get("SPP_CURATE_CACHE") or Path.home() / ".cache" / "spp-curate") / "pixel-references"


def pixel_references(train_px: np.ndarray, train_y: np.ndarray, test_px: np.ndarray,
                     test_y: np.ndarray, ks: tuple[int, ...] = (200,)) -> dict[str, Any]:
    """The references every result is read against: the same kNN (at each of ``ks``), 1-NN and linear probe on
    the raw pixels of the split. They depend on the pictures alone, so they are computed once per split and
    kept, in this process and on disk (keyed by a digest of the pixels and labels): the pixel probe is the
    slow part of an evaluation."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (train_px, train_y, test_px, test_y):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    key = f"{digest.hexdigest()}-v{PIXEL_REFERENCE_VERSION}"
    path = pixel_reference_dir() / f"{key}.json"
    if key not in _PIXEL_REFERENCES and path.is_file():
        try:
            _PIXEL_REFERENCES[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    refs = _PIXEL_REFERENCES.setdefault(key, {})
    missing = [k for k in ks if str(k) not in refs.get("pixel_knn_top1_at", {})]
    if missing or "pixel_linear_top1" not in refs:
        from ..progress import phase

        train_px, test_px = train_px.astype(np.float32), test_px.astype(np.float32)
        with phase(f"eval: raw-pixel kNN (k={', '.join(map(str, missing))}) and 1-NN"):
            found = knn_accuracies(train_px, train_y, test_px, test_y, (*missing, 1))
        refs.setdefault("pixel_knn_top1_at", {}).update({str(k): a for k, a in zip(missing, found)})
        refs["pixel_1nn_top1"] = found[-1]
        if "pixel_linear_top1" not in refs:
            refs["pixel_linear_top1"] = linear_top1(train_px, train_y, test_px, test_y, label="eval: raw-pixel probe")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, refs)
        except OSError:
            pass  # a cache that cannot be written costs the next run the time, nothing else
    at = refs["pixel_knn_top1_at"]
    return {"pixel_knn_top1": at[str(ks[0])], "pixel_1nn_top1": refs["pixel_1nn_top1"],
            "pixel_knn_top1_at": {str(k): at[str(k)] for k in ks}, "pixel_linear_top1": refs["pixel_linear_top1"]}


def evaluate(run: Path, source: str, root: str | None, test_root: str | None = None,
             limit: int | None = None, ks: tuple[int, ...] = (200,), name: str = "eval.json") -> dict[str, Any]:
    """kNN (at each of ``ks``; ``knn_top1`` at the first) and linear top-1 on the source's train/test split;
    writes ``RUN/eval.json`` (or ``RUN/<name>``)."""
    from ..progress import phase

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
    with phase(f"eval: kNN (k={', '.join(map(str, ks))})"):
        found = knn_accuracies(train_f, train_y, test_f, test_y, ks)
    result = {"knn_top1": found[0], "knn_top1_at": {str(k): a for k, a in zip(ks, found)},
              "linear_top1": linear_top1(train_f, train_y, test_f, test_y, label="eval: linear probe"),
              **pixel_references(train_px, train_y, test_px, test_y, ks),
              "train_images": len(train_y), "test_images": len(test_y), "knn_k": ks[0], "knn_ks": list(ks),
              "knn_t": 0.1, "linear_probe": "standardised features, L-BFGS"}
    write_json(Path(run) / name, result)
    return result
