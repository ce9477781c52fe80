"""WebDataset tar shards: one picture per sample, labelled by ``.cls`` or ``.json`` members."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from ...errors import KeyRefused, UserError
from ...files import file_identity
from .base import Source, register, state_hash


@register
class WebDatasetSource(Source):
    """WebDataset tars of single images: ``wds:/data/shards-{000000..000099}.tar``.

    Samples are grouped the way webdataset groups them (``base_plus_ext``): each
    sample's image member (jpg, png, ...) is the picture; the label comes from
    its ``cls`` member or from ``label`` in its ``json`` member (with
    ``label_name`` as the class name where given). Keys are ``<shard name>/<sample
    key>``; members are read in place by offset. A member with an absolute or
    ``..`` path, a sample with a second image, or a label that is not an integer
    is reported (and quarantined by the index stage), never read or guessed at.
    """

    kind = "wds"
    form = "wds:SHARDS"
    reference_example = "wds:/data/eval-{0000..0009}.tar"
    takes_argument = True
    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
    MAX_META_BYTES = 1 << 20

    def __init__(self, pattern: str, split: str = "train") -> None:
        import glob

        from braceexpand import braceexpand

        self.pattern, self.split = pattern, split
        paths = sorted({p for part in braceexpand(pattern) for p in (glob.glob(part) or [part])})
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise UserError(f"no tar shards at {missing[0] if missing else pattern}", option="--source")
        self.paths = paths
        # A shard is named by its path below the folder all shards share, so that two shards with one file
        # name in different folders (``{a,b}/shard.tar``) give different keys; shards of one folder: the name.
        parents = [str(Path(p).resolve().parent) for p in paths]
        common = Path(os.path.commonpath(parents)) if parents else Path()
        self._shard_name = {p: Path(p).resolve().relative_to(common).as_posix() for p in paths}
        self.members: dict[str, tuple[str, int, int]] = {}
        self.samples: list[tuple[str, int]] = []
        self.listing_problems = []
        names: dict[int, str] = {}
        for path in paths:
            self._list_shard(path, names)
        top = max((lab for _, lab in self.samples), default=-1)
        self.class_names = [names.get(i, str(i)) for i in range(top + 1)] if top >= 0 else []

    def _list_shard(self, path: str, names: dict[int, str]) -> None:
        import tarfile

        from webdataset.tariterators import base_plus_ext

        shard = self._shard_name[path]
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isdir():
                    continue  # a folder entry holds no picture
                if not m.isfile():
                    kind = ("a link" if m.issym() or m.islnk() else "a FIFO" if m.isfifo()
                            else "a device" if m.isdev() else "not a plain file")
                    self.listing_problems.append((f"{shard}/{m.name}", f"refused tar member: {kind}"))
                    continue
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    self.listing_problems.append((f"{shard}/{m.name}", "refused tar member: absolute or '..' path"))
                    continue
                prefix, ext = base_plus_ext(m.name)
                if prefix is None:  # ".hidden.png": webdataset's grouping finds no key before the first dot
                    self.listing_problems.append((f"{shard}/{m.name}", "a tar member with no sample key before its "
                                                  "first dot; webdataset cannot group it into a sample"))
                    continue
                samples.setdefault(f"{shard}/{prefix}", {})[ext.lower()] = m

            def small(member: tarfile.TarInfo) -> bytes:
                if member.size > self.MAX_META_BYTES:
                    raise ValueError(f"{member.name} is {member.size:,} bytes, over {self.MAX_META_BYTES:,}")
                return tar.extractfile(member).read()

            for key, parts in samples.items():
                images = [e for e in self.IMAGE_EXTS if e in parts]
                if not images:
                    # Every member is indexed or reported: "dot.in.name.png" is webdataset's sample "dot" with
                    # the extension "in.name.png", which names no picture; a sample of metadata alone neither.
                    for ext, member in parts.items():
                        pictured = ext.rsplit(".", 1)[-1] in self.IMAGE_EXTS
                        self.listing_problems.append((f"{shard}/{member.name}", (
                            f"a dot in the sample key: webdataset reads it as sample {key.split('/')[-1]!r} with "
                            f"extension {ext!r}, which names no picture" if pictured else
                            f"sample {key.split('/')[-1]!r} has no picture member ({', '.join(sorted(parts))})")))
                    continue
                for extra in images[1:]:
                    self.listing_problems.append(
                        (f"{key}.{extra}", f"a second image in sample {key} (its .{images[0]} is used)"))
                try:
                    label = self._label(parts, small, names)
                    if not -1 <= label < self.MAX_LABEL:
                        raise ValueError(f"label {str(label)[:40]} is outside -1 to {self.MAX_LABEL - 1:,}")
                except (ValueError, TypeError, UnicodeDecodeError) as exc:
                    self.listing_problems.append((key, f"bad label: {exc}"))
                    continue
                image = parts[images[0]]
                self.members[key] = (path, image.offset_data, image.size)
                self.samples.append((key, label))

    @staticmethod
    def _label(parts: dict, read_small, names: dict[int, str]) -> int:
        import json

        if "cls" in parts:
            text = read_small(parts["cls"]).decode().strip()
            if not re.fullmatch(r"-?\d{1,12}", text or "-1"):
                raise ValueError(f"its .cls member holds {text[:40]!r}, not an integer")
            return int(text or -1)
        if "json" in parts:
            meta = json.loads(read_small(parts["json"]) or b"{}")
            if not isinstance(meta, dict) or "label" not in meta:
                return -1
            if not isinstance(meta["label"], int) or isinstance(meta["label"], bool):
                raise ValueError(f"its json label is {meta['label']!r}, not an integer")
            if "label_name" in meta and meta["label"] >= 0:
                names[meta["label"]] = str(meta["label_name"])
            return meta["label"]
        return -1

    def items(self) -> Iterator[tuple[str, int]]:
        yield from self.samples

    def read(self, key: str) -> bytes:
        try:
            path, offset, size = self.members[key]
        except (KeyError, TypeError):
            raise KeyRefused(f"refused key {key!r}: no such sample in these shards") from None
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def state(self) -> str:
        return state_hash(f"{p}:{file_identity(os.stat(p))}" for p in self.paths)

    def describe(self) -> str:
        return f"wds {self.pattern} ({len(self.samples)} images)"
