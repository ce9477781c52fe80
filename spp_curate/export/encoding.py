"""The bytes a release stores for a picture: the source's own, checked against the digest indexed, or a re-encode
where its container differs from the release's one format or it must shrink."""

from __future__ import annotations

import io

from PIL import Image

from ..curate.sources import Source
from ..errors import UserError
from ..files import sha256_bytes
from ..images import read_bytes, read_image

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png"}


def release_format(formats) -> str:
    """The one container format a release stores: JPEG when most images are JPEG (the first seen of the most
    common, on a tie), else PNG. Counted in Arrow: no Python string per image."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    # a Series's own array: pa.array(series) asks the Series for __arrow_array__, which pandas looks up in its
    # index, building a hash table of every key as a Python string (100 MB at 1.28M keys)
    counts = pc.value_counts(pa.array(getattr(formats, "array", formats), from_pandas=True))  # in the order first seen
    if not len(counts):
        return "PNG"
    common = counts.field("values")[int(np.argmax(counts.field("counts").to_numpy()))].as_py()
    return "JPEG" if common == "JPEG" else "PNG"


def encoded_image(source: Source, key: str, digest: str, fmt: str, target: str,
                  max_side: int | None = None) -> bytes:
    """The image's original bytes (checked against the digest indexed), or a re-encode when its container
    differs or it must shrink. Bytes passed through are not decoded again: the index stage decoded them."""
    stale = UserError(f"{key} changed since it was indexed (its bytes, though not its size and modification "
                      "time); run `spp-curate build --rehash` to read every file again and take the change in",
                      option="--source")
    if fmt == target and not max_side:
        data = read_bytes(source, key)
        if sha256_bytes(data) != digest:
            raise stale
        return data
    loaded = read_image(source, key)
    data, img = loaded.data, loaded.image
    if sha256_bytes(data) != digest:
        raise stale  # a re-encode too is of the picture that was embedded, or of none
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    elif fmt == target:
        return data
    buf = io.BytesIO()
    img.save(buf, format=target, **({"quality": 95} if target == "JPEG" else {}))
    return buf.getvalue()
