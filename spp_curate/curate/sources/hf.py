"""Any Hugging Face image-classification dataset, from the Hub or a ``save_to_disk`` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...errors import KeyRefused, UserError, brief
from .base import Source, register, row_of, state_hash


def _feature_kind(feature) -> str:
    """A Hugging Face feature in words, for an error line: ``int64 values``, ``Image values``."""
    name = type(feature).__name__
    return f"{feature.dtype if name == 'Value' else name} values"


def _saved_without_rows(name: str) -> bool:
    """Whether ``name`` is a ``save_to_disk`` folder of zero rows (which ``load_from_disk`` cannot open)."""
    import json

    state = Path(name) / "state.json"
    try:
        return state.is_file() and state.stat().st_size < 1 << 20 and json.loads(state.read_text())["_data_files"] == []
    except (OSError, ValueError, KeyError, TypeError):
        return False


@register
class HFSource(Source):
    """Any Hugging Face image-classification dataset: ``hf:<hub-id>`` or ``hf:<local dir>``.

    A directory written by ``Dataset.save_to_disk`` is opened with
    ``load_from_disk``; anything else goes through ``load_dataset``. Both are
    Arrow files memory-mapped from disk, so a dataset larger than RAM is read
    without being loaded. The image column is the first ``Image`` feature and
    the label column the first ``ClassLabel`` (or ``--image-column`` /
    ``--label-column``); ClassLabel names become class names. Keys are
    ``<split>/<row>``.
    """

    kind = "hf"
    form = "hf:NAME-OR-DIR"
    reference_example = "hf:org/name:test"
    takes_argument = True

    @classmethod
    def open(cls, argument: str, root: str | None, split: str, image_column: str | None = None,
             label_column: str | None = None) -> "HFSource":
        return cls(argument or root or "", split, image_column, label_column)

    def __init__(self, name: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None) -> None:
        import datasets

        self.name, self.split = name, split
        try:
            if Path(name).is_dir() and not (Path(name) / "README.md").exists() and \
                    any((Path(name) / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - missing, offline, or not a dataset
            if _saved_without_rows(name):
                raise UserError(f"{name} holds no rows", option="--source") from None
            raise UserError(f"cannot open Hugging Face dataset {name!r}: {brief(exc, 200)}",
                            option="--source") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{name} has no split {split!r}; accepted: {', '.join(ds)}", option="--split")
            ds = ds[split]
        if len(ds) == 0:
            raise UserError(f"{name} ({split}) holds no rows", option="--source")
        feats = ds.features
        images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        self.image_column = image_column or (images[0] if images else None)
        if self.image_column not in feats:
            raise UserError(f"{name} has no image column{f' {image_column!r}' if image_column else ''}; "
                            f"columns: {', '.join(feats)}", option="--image-column")
        if not isinstance(feats[self.image_column], datasets.Image):
            raise UserError(f"column {self.image_column!r} of {name} holds {_feature_kind(feats[self.image_column])}, "
                            f"not images; image columns: {', '.join(images) or 'none'}", option="--image-column")
        self.label_column = label_column or next(
            (c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column and label_column not in feats:
            raise UserError(f"{name} has no column {label_column!r}; columns: {', '.join(feats)}",
                            option="--label-column")
        self.class_names, self._labels = [], None
        if self.label_column:
            self._read_labels(ds, feats[self.label_column])
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.listing_problems = []

    def _read_labels(self, ds, feature) -> None:
        """Take the label column: a ClassLabel (its names become class names), integers, or strings (each
        distinct string a class, numbered in sorted order as ImageFolder numbers folders). Anything else is
        refused here; a row whose label is out of range is quarantined when listed."""
        import datasets
        import pyarrow.types as pat

        wrong = UserError(f"column {self.label_column!r} holds {_feature_kind(feature)}; accepted: a ClassLabel, "
                          "integer or string column", option="--label-column")
        if self.label_column == self.image_column or not isinstance(feature, (datasets.ClassLabel, datasets.Value)):
            raise wrong  # before its values are read: an image column is all the pictures
        column = ds.select_columns([self.label_column]).with_format("arrow")[:].column(0)
        dtype = column.type
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = [str(n) for n in feature.names]
        if pat.is_integer(dtype):
            self._labels = column.to_pylist()
        elif pat.is_string(dtype) or pat.is_large_string(dtype):
            values = [None if v is None else str(v) for v in column.to_pylist()]
            if not any(values):
                raise UserError(f"column {self.label_column!r} holds no labels", option="--label-column")
            distinct = sorted({v for v in values if v})
            if len(distinct) > self.MAX_LABEL:
                raise UserError(f"column {self.label_column!r} holds {len(distinct):,} distinct labels, over "
                                f"{self.MAX_LABEL:,}", option="--label-column")
            number = {v: i for i, v in enumerate(distinct)}
            self.class_names = distinct
            self._labels = [number[v] if v else -1 for v in values]
        else:
            raise wrong

    def items(self) -> Iterator[tuple[str, int]]:
        names = len(self.class_names) or None  # labels past the class names are refused where there are names
        for i in range(len(self.ds)):
            key = f"{self.split}/{i:08d}"
            label = -1 if self._labels is None or self._labels[i] is None else self._labels[i]
            if not -1 <= label < self.MAX_LABEL:
                self.listing_problems.append((key, f"bad label: label {str(label)[:40]} is outside -1 to "
                                                   f"{self.MAX_LABEL - 1:,}"))
                continue
            if names is not None and label >= names:
                self.listing_problems.append((key, f"bad label: label {label} is past the {names} class names"))
                continue
            yield key, label

    def read(self, key: str) -> bytes:
        cell = self.ds[row_of(key, self.split, 8, len(self.ds))][self.image_column]
        if not cell:
            raise OSError("the row's image cell is empty")
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            # A row naming a file (datasets loaded from image files): read only inside the dataset's own
            # folder or the Hugging Face caches, never a path the data chose elsewhere.
            path = Path(cell["path"]).resolve()
            if any(path.is_relative_to(root) for root in self._file_roots()):
                return path.read_bytes()
            raise KeyRefused(f"refused: row {key} names a file outside the dataset and the Hugging Face cache")
        raise OSError("row holds neither image bytes nor a path")

    def _file_roots(self) -> list[Path]:
        import datasets
        from huggingface_hub import constants

        roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
        if Path(self.name).is_dir():
            roots.append(Path(self.name))
        return [r.resolve() for r in roots]

    def state(self) -> str:
        return state_hash([self.name, self.split, str(len(self.ds)), str(getattr(self.ds, "_fingerprint", ""))])

    def describe(self) -> str:
        return f"hf {self.name} ({self.split}, {len(self.ds)} rows)"
