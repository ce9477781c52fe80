"""The dataset card (``release/README.md``): a YAML header the Hub reads, and a body a stranger can use."""

from __future__ import annotations

from typing import Any

import datasets
import yaml

from ..config import PARTNER_WORDS, Recipe

CITATIONS = """@misc{sepp_id_2306_16122,
  title         = {Semantic Positive Pairs for Enhancing Visual Representation Learning of Instance Discrimination Methods},
  eprint        = {2306.16122},
  archivePrefix = {arXiv},
  year          = {2023}
}
@misc{semantic_pairs_2510_08722,
  title         = {Enhancing Self-Supervised Learning with Semantic Pairs: A New Dataset and Empirical Study},
  eprint        = {2510.08722},
  archivePrefix = {arXiv},
  year          = {2025}
}"""


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < bound:
            return name
    return "100M<n<1B"


def card_header(recipe: Recipe, features: datasets.Features, pairs: int, parquet_bytes: int,
                counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The YAML header the Hub and ``load_dataset`` read: the configs and their declared features."""
    if recipe.layout == "images":
        configs, info = images_configs(recipe, features, pairs, counts or {})
    else:
        configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
        info = {"features": features._to_yaml_list(),
                "splits": [{"name": "train", "num_bytes": parquet_bytes, "num_examples": pairs}],
                "download_size": parquet_bytes, "dataset_size": parquet_bytes}
    return {
        "license": recipe.license,
        "pretty_name": recipe.name,
        "task_categories": ["image-feature-extraction"],
        "tags": ["semantic-positive-pairs", "self-supervised-learning", "contrastive-learning", "spp-curate"],
        "size_categories": [size_category(pairs)],
        "configs": configs,
        "dataset_info": info,
    }


def images_configs(recipe: Recipe, features: datasets.Features, pairs: int, counts: dict[str, int]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``images`` layout's two configs, ``pairs`` (the default: rows of keys) and ``images`` (each picture
    once), with their features; ``spp_curate.load_pairs`` joins them."""
    from .pictures import image_features, pair_table_features

    names = features["label"].names if isinstance(features["label"], datasets.ClassLabel) else []
    configs = [{"config_name": "pairs", "default": True,
                "data_files": [{"split": "train", "path": "data/pairs-*.parquet"}]}]
    info = [{"config_name": "pairs", "features": pair_table_features(names, recipe.images == "none")._to_yaml_list(),
             "splits": [{"name": "train", "num_examples": pairs}]}]
    if recipe.images != "none":
        configs.append({"config_name": "images", "data_files": [{"split": "train", "path": "data/images-*.parquet"}]})
        info.append({"config_name": "images", "features": image_features(names)._to_yaml_list(),
                     "splits": [{"name": "train", "num_examples": int(counts.get("pictures", 0))}]})
    return configs, info


def may_redistribute(recipe: Recipe) -> bool:
    """Whether this release's pictures may be published: its recipe says so and its source kind allows it."""
    from ..curate.sources.base import source_class

    return bool(recipe.redistribute) and source_class(recipe.source_spec.kind).redistributable


def licence_lines(recipe: Recipe) -> list[str]:
    if may_redistribute(recipe):
        return []
    return ["## Licence of the pictures", "",
            f"The pictures of `{recipe.source}` may not be redistributed. "
            + ("This release carries none: rebuild them from your own copy with `spp-curate materialize`."
               if recipe.images == "none" else
               "This release carries them; whoever publishes it states that they hold the rights to (pushed with "
               "`--i-hold-the-rights`)."), ""]


def leakage_lines(leakage: dict[str, Any] | None) -> list[str]:
    """The card's leakage section: which evaluation sets the pairs are clean against, and how that was checked."""
    lines = ["## Leakage", ""]
    if not leakage:
        return lines + ["This release was not checked against any evaluation set at build time. "
                        "`spp-curate audit RELEASE --against SPEC` counts its near-copies of one.", ""]
    lines += [f"No image of a pair is a near-copy of these reference sets: copy score below "
              f"{leakage['threshold']:.4f} (given as `{leakage['threshold_given']}`; {leakage['method']}) and "
              "no byte-identical file. "
              f"{leakage['excluded']:,} build image(s) were excluded.", "",
              "| reference set | split | images | sha256 of its key list | excluded | same bytes |",
              "|---|---|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['split']} | {r['count']:,} | `{r['keys_sha256'][:16]}` | {r['excluded']:,} | "
              f"{r['same_digest']:,} |" for r in leakage["references"]]
    return lines + [""]


def _threshold(thresholds: dict[str, dict[str, Any]], field: str) -> str:
    """A rule's threshold as used, with the quantile of the candidates it was given as."""
    t = thresholds.get(field)
    if t is None:
        return "(not recorded)"
    given = str(t["given"])
    if t["value"] is None:
        return "(off)"
    return f"{t['value']:.4g}" + (f" (the {given[1:]} quantile of the candidates' similarities)"
                                  if given.startswith("q") else "")


def review_lines(review: dict[str, Any] | None) -> list[str]:
    """The card's review section: what people decided on the pairs, and which pairs this release holds."""
    if not review:
        return []
    held = {"all": "every mined pair, whatever the reviews say",
            "accepted": "only the pairs a reviewer accepted and none rejected",
            "not-rejected": "every mined pair that no reviewer rejected"}[review["selected"]]
    agreement = ("no pair was reviewed by two people" if review["agreement"] is None else
                 f"on the {review['pairs_reviewed_by_two_or_more']:,} pairs reviewed by two or more, they agreed on "
                 f"{review['agreement']:.1%}")
    precision = review.get("precision_released")
    return ["## Review", "",
            f"{review['pairs_reviewed']:,} of the {review['pairs_mined']:,} mined pairs were reviewed by hand by "
            f"{len(review['reviewers'])} reviewer(s): {review['accepted']:,} accepted, {review['rejected']:,} "
            f"rejected; {agreement}. This release holds {held}: {review['pairs_released']:,} pairs"
            + (f" (labels agree on {precision:.4f} of them)." if precision is not None else "."), "",
            *estimate_lines(review.get("precision_estimate")), *shipped_lines(review.get("precision_shipped"))]


def shipped_lines(shipped: dict[str, Any] | None) -> list[str]:
    """The precision of the pairs this release ships, as the reviews tell it (what the trainer weights by)."""
    if not shipped or shipped.get("value") is None:
        return []
    return [f"**Precision of the {shipped['pairs']:,} shipped pairs: {shipped['value']:.3f}** ({shipped['judged']:,} "
            f"of them judged by hand; {shipped['method']}).", ""]


def estimate_lines(est: dict[str, Any] | None) -> list[str]:
    """The precision the reviewed random sample gives the mined pairs, like a poll's result."""
    if not est or est.get("value") is None:
        return []
    kappa = (f"; Cohen's kappa {est['kappa']:.2f} on the {est['pairs_judged_by_two']:,} pairs two of them judged"
             if est.get("kappa") is not None else "")
    return [f"**Precision of the mined pairs, estimated by review: {est['value']:.3f}** ({est['confidence']:.0%} interval "
            f"{est['low']:.3f}-{est['high']:.3f}), from {est['pairs_reviewed']:,} pairs reviewed at random "
            f"by {', '.join(est['reviewers'])} on {est.get('date', 'the date of export')}; method: {est['method']}"
            f"{kappa}.", ""]


def band_lines(trust: dict[str, Any] | None) -> list[str]:
    """Precision by similarity band: where the sampler's mistakes are (``train --partner-trust similarity``
    weights each pair by its band's)."""
    if not trust:
        return []
    edges = [None, *trust["cuts"], None]
    rows = ["| similarity | pairs | precision |", "|---|---|---|"]
    for h, band in enumerate(trust["bands"]):
        low, high = edges[h], edges[h + 1]
        span = (f"below {high:.3f}" if low is None else f"{low:.3f} and up" if high is None
                else f"{low:.3f} to {high:.3f}")
        precision = "n/a" if band["precision"] is None else f"{band['precision']:.3f}"
        rows.append(f"| {span} | {band['pairs']:,} | {precision} |")
    return [f"Precision by similarity band ({trust['source']}; `spp-curate train --partner-trust similarity` "
            "weights each pair by its band's):", "", *rows, ""]


def version_lines(versions: dict[str, Any] | None) -> list[str]:
    """The card's version section: this release's version, its parent, and what changed since."""
    if not versions or not versions.get("parent"):
        return []
    parent, log = versions["parent"], versions["changelog"] or {}
    lines = ["## Changes", "",
             f"Version {versions['version']}, replacing version {parent['version']} (manifest sha256 "
             f"`{parent['manifest_sha256'][:16]}`; `spp-curate diff OLD NEW` compares two releases).", ""]
    if log.get("pairs"):
        lines.append(f"- pairs: {log['pairs']['added']:,} added, {log['pairs']['removed']:,} removed, "
                     f"{log['pairs']['kept']:,} kept")
    if log.get("images"):
        n = {k: v if isinstance(v, int) else len(v) for k, v in log["images"].items()}
        lines.append(f"- source images: {n['added']:,} added, {n['removed']:,} removed, {n['changed']:,} changed "
                     "(listed in changelog.parquet)")
    return lines + [""]


def render_card(recipe: Recipe, features: datasets.Features, counts: dict[str, int], parquet_bytes: int,
                metrics: dict[str, Any] | None, figure: str | None, image_ext: str,
                review: dict[str, Any] | None = None, versions: dict[str, Any] | None = None,
                pair_trust: dict[str, Any] | None = None) -> str:
    header = yaml.safe_dump(card_header(recipe, features, counts["pairs"], parquet_bytes, counts), sort_keys=False,
                            allow_unicode=True)
    lines = [f"# {recipe.name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    thresholds = (metrics or {}).get("thresholds") or {
        f: {"given": str(getattr(recipe, f)), "value": getattr(recipe, f)} for f in ("min_similarity", "dup_threshold")
        if isinstance(getattr(recipe, f), float)}
    lines += [
        "Semantic positive pairs: each row holds two *different* images of the *same category*, "
        "for use as extra positives in self-supervised instance discrimination (MoCo-v2, SimCLR, SimSiam, BYOL).",
        "",
        f"- pairs: **{counts['pairs']:,}** over {counts['images']:,} indexed images "
        f"({counts['quarantined']:,} unreadable images quarantined)",
        f"- source: `{recipe.source}` (split `{recipe.split}`)",
        f"- encoder: `{recipe.encoder}`" + (f" at {recipe.image_size}px" if recipe.image_size else ""),
        f"- rules: same category by `{recipe.category}`, {recipe.k} nearest neighbours, similarity >= "
        f"{_threshold(thresholds, 'min_similarity')}, below the embedding duplicate threshold "
        f"{_threshold(thresholds, 'dup_threshold')}, not byte-identical and not copies of each other by picture "
        f"(copy score below {recipe.copy_threshold if recipe.copy_threshold is not None else 'off'}), "
        f"at most {recipe.max_per_anchor} per anchor{PARTNER_WORDS[recipe.partner]}"
        f"{', mutual neighbours only' if recipe.mutual else ''}, "
        "each unordered pair once",
        "",
    ]
    if metrics:
        precision = metrics.get("precision")
        lines += ["## Quality", "",
                  f"- precision (share of pairs whose two labels agree): "
                  f"{'n/a (no labels)' if precision is None else f'{precision:.4f}'}",
                  f"- coverage (share of images in at least one pair): {metrics['coverage']:.4f}",
                  "- removed by each filter: " + ", ".join(f"{k} {v:,}" for k, v in metrics["filter_removed"].items()),
                  ""]
    lines += band_lines(pair_trust)
    lines += version_lines(versions)
    lines += review_lines(review)
    lines += leakage_lines(metrics.get("leakage") if metrics else None)
    lines += licence_lines(recipe)
    if figure:
        lines += [f"![pair grid: anchor | positive]({figure})", ""]
    if recipe.images == "none":
        lines += [
            "## ID-only release", "",
            "This release carries no pixels: each pair names its two images by source key and sha256 digest. "
            "Rebuild the image shards from your own copy of the source, checking every digest:", "",
            "```bash",
            f"spp-curate materialize RELEASE_DIR --source {recipe.source} --root /path/to/your/copy "
            "--out materialized/",
            "```", "",
            "## Citation", "", "```bibtex", CITATIONS, "```", "",
        ]
        return f"---\n{header}---\n\n" + "\n".join(lines)
    if recipe.layout == "images":
        lines += [
            "## Use", "",
            f"Each picture is stored once ({counts.get('pictures', 0):,} pictures in `data/images-*.parquet`); the "
            f"pairs are rows of keys (`data/pairs-*.parquet`). Pair rows with both pictures:", "",
            "```python",
            "import spp_curate",
            'pairs = spp_curate.load_pairs("path/or/org-name")   # a datasets.Dataset: anchor, positive (PIL), keys, ...',
            "```", "",
            "or the two configs with `datasets` alone:", "",
            "```python",
            "from datasets import load_dataset",
            'keys = load_dataset("path/or/org-name", "pairs", split="train")      # pair_id, anchor_key, positive_key, ...',
            'pictures = load_dataset("path/or/org-name", "images", split="train")  # key, image, digest, label',
            "```", "",
            "`manifest.json` lists every file with its sha256, bytes and rows; `spp-curate verify .` checks them.", "",
            "## Citation", "", "```bibtex", CITATIONS, "```", "",
        ]
        return f"---\n{header}---\n\n" + "\n".join(lines)
    lines += [
        "## Use", "",
        "```python",
        "from datasets import load_dataset",
        'pairs = load_dataset("path/or/org-name", split="train")   # Parquet shards under data/',
        'row = pairs[0]; row["anchor"], row["positive"]            # PIL images',
        "```", "",
        "The same pairs as WebDataset shards under `wds/`, one sample per pair "
        f"(`<pair_id>.anchor.{image_ext}`, `<pair_id>.positive.{image_ext}`, `<pair_id>.json`):", "",
        "```python",
        "import webdataset as wds",
        f'ds = wds.WebDataset("wds/pairs-{{000000..{max(counts["shards"] - 1, 0):06d}}}.tar").decode("pil")'
        f'.to_tuple("anchor.{image_ext}", "positive.{image_ext}", "json")',
        "```", "",
        "`manifest.json` lists every file with its sha256, bytes and rows; `spp-curate verify .` checks them.", "",
        "## Citation", "", "```bibtex", CITATIONS, "```", "",
    ]
    return f"---\n{header}---\n\n" + "\n".join(lines)
