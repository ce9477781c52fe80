"""What "same category" means: ground-truth labels, zero-shot pseudo-labels, k-means clusters, or nothing.

Each mode turns the embeddings into one category id per image (-1 where
unknown); the miner then searches neighbours within each category. ``none``
puts every image in one category: the SePP-ID semantic sampler alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from ..errors import UserError

CATEGORY_MODES = ("label", "zeroshot", "cluster", "none")
# A few of CLIP's ImageNet prompt templates: averaging prompts is the standard zero-shot recipe.
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
                      "a photo of the small {}.", "a low resolution photo of a {}.", "a good photo of a {}.")


@dataclass
class Categories:
    mode: str
    ids: np.ndarray  # one category per image, -1 = none
    names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def groups(self, valid: np.ndarray) -> list[np.ndarray]:
        usable = np.flatnonzero(valid & (self.ids >= 0))
        order = usable[np.argsort(self.ids[usable], kind="stable")]  # positions by category, ascending within
        cats = self.ids[order]
        starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]]) if len(cats) else np.empty(0, np.int64)
        return np.split(order, starts[1:]) if len(cats) else []


#: A class-names file is read up to this size (ImageNet-21k's 21,841 names take about 400 KB).
MAX_CLASS_NAMES_BYTES = 16 * 2**20


def read_class_names_file(path: str) -> list[str]:
    """One class name per line, UTF-8; a one-line error naming ``--class-names`` for anything else (the build's
    preflight reads it, so a wrong file fails before the index and embed stages run)."""
    from ..files import read_capped

    try:
        text = read_capped(path, MAX_CLASS_NAMES_BYTES, str(path)).decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", option="--class-names") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        "give one class name per line", option="--class-names") from None
    except ValueError as exc:  # over the size limit
        raise UserError(str(exc), option="--class-names") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path} holds no class names (one per line)", option="--class-names")
    return names


def zeroshot_labels(vectors: np.ndarray, class_names: list[str], encoder: str, image_size: int | None,
                    batch: int = 65_536) -> np.ndarray:
    """Argmax over the prompts' text embeddings of the same open_clip model that embedded the images."""
    import torch

    from ..curate.encoders import load_text_encoder

    tokenizer, text_model = load_text_encoder(encoder, image_size)
    with torch.inference_mode():
        weights = []
        for name in class_names:
            feats = text_model(tokenizer([t.format(name) for t in ZEROSHOT_TEMPLATES])).float()
            feats = torch.nn.functional.normalize(feats, dim=-1).mean(0)
            weights.append(torch.nn.functional.normalize(feats, dim=0))
        classifier = torch.stack(weights).numpy()
    labels = np.empty(len(vectors), dtype=np.int64)
    for lo in range(0, len(vectors), batch):
        labels[lo: lo + batch] = np.argmax(vectors[lo: lo + batch].astype(np.float32) @ classifier.T, axis=1)
    return labels


def kmeans_labels(vectors: np.ndarray, valid: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """faiss k-means on the valid rows, seeded; every valid row gets its nearest centroid."""
    rows = np.flatnonzero(valid)
    if clusters > len(rows):
        raise UserError(f"{clusters} clusters for {len(rows)} images; use fewer", option="--clusters")
    data = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    km = faiss.Kmeans(data.shape[1], clusters, niter=20, seed=seed, spherical=True, gpu=False,
                      max_points_per_centroid=512, verbose=False)
    km.train(data)
    _, assign = km.index.search(data, 1)
    labels = np.full(len(vectors), -1, dtype=np.int64)
    labels[rows] = assign[:, 0]
    return labels


def assign_categories(mode: str, vectors: np.ndarray, valid: np.ndarray, labels: np.ndarray,
                      class_names: list[str], encoder: str, image_size: int | None, clusters: int,
                      seed: int) -> Categories:
    if mode == "label":
        if not (labels >= 0).any():
            raise UserError("the source has no labels; use --category zeroshot, cluster or none",
                            option="--category")
        return Categories("label", labels.copy(), class_names)
    if mode == "none":
        return Categories("none", np.where(valid, 0, -1))
    if mode == "cluster":
        ids = kmeans_labels(vectors, valid, clusters, seed)
        return Categories("cluster", ids, [f"cluster {i}" for i in range(clusters)], {"clusters": clusters})
    if mode == "zeroshot":
        if not class_names:
            raise UserError("zero-shot needs class names: the source has none; pass --class-names FILE",
                            option="--category")
        ids = np.where(valid, zeroshot_labels(vectors, class_names, encoder, image_size), -1)
        info: dict[str, Any] = {"classes": len(class_names), "templates": len(ZEROSHOT_TEMPLATES)}
        known = valid & (labels >= 0)
        if known.any() and labels[known].max() < len(class_names):
            info["zeroshot_accuracy"] = float((ids[known] == labels[known]).mean())
        return Categories("zeroshot", ids, class_names, info)
    raise UserError(f"got {mode!r}; accepted: {', '.join(CATEGORY_MODES)}", option="--category")
