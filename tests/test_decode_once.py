"""Pixels are decoded once per build (the embed stage), and the device decode path agrees with Pillow's.

The index checks a whole JPEG from its header and decodes everything else; these tests hold it to what the
one loader's full decode says of each file of the odd and broken corpus, and show the embed stage
quarantining the one kind of file a header cannot catch. The device path (``--decode device``: batched
``torchvision.io.decode_jpeg`` and tensor preprocessing; nvJPEG on a GPU, libjpeg-turbo here) is held to
the Pillow path on real photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spp_curate.checkpoint import eval_transform
from spp_curate.curate.embed import _collate_mixed, _IndexedImages, device_batch
from spp_curate.curate.encoders import load_encoder, tensor_preprocess
from spp_curate.curate.sources import ImageFolderSource
from spp_curate.images import BadImage, check_image, decode_with_format
from spp_curate.layout import chunk_keys_path, chunk_paths

from conftest import TEST_ENCODER, run_cli
from images import broken_behind_header, broken_files, fmnist_pictures, jpeg_bytes, odd_files

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def corpus(tmp: Path) -> Path:
    """A class-folder tree: real pictures, every odd and broken file, a JPEG broken behind its header,
    a JPEG with zero padding after its end marker, and real photos (crops of a committed photograph)."""
    root = tmp / "images"
    pictures = fmnist_pictures(12, size=96)
    for n, (label, img) in enumerate(pictures):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        (root / f"c{label}" / f"{n:03d}.jpg").write_bytes(jpeg_bytes(img))
    photo = Image.open(PHOTO).convert("RGB")
    (root / "photo").mkdir()
    for n, box in enumerate([(0, 0, 512, 600), (40, 60, 400, 300), (100, 0, 300, 500), (0, 200, 512, 560)]):
        (root / "photo" / f"p{n}.jpg").write_bytes(jpeg_bytes(photo.crop(box)))
    picture = pictures[0][1]
    for name, data in odd_files(picture).items():
        (root / "c0" / f"odd_{name}").write_bytes(data)
    for name, (data, _) in broken_files(picture).items():
        (root / "c1" / f"bad_{name}").write_bytes(data)
    (root / "c1" / "bad_behind_header.jpg").write_bytes(broken_behind_header(picture))
    (root / "c2" / "padded.jpg").write_bytes(jpeg_bytes(picture) + b"\0" * 100)
    return root


def full_decode(data: bytes) -> tuple[int, int, str] | str:
    """What decoding the whole file says: its upright size and format, or the reason it is refused."""
    try:
        img, fmt = decode_with_format(data)
        return img.width, img.height, fmt
    except BadImage as exc:
        return str(exc)


def make_builds(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The corpus embedded twice, on the Pillow path and on the device path (``tests/test_cuda.py`` too)."""
    root = corpus(tmp_path_factory.mktemp("corpus"))
    out = {}
    for decode in ("pillow", "device"):
        out[decode] = tmp_path_factory.mktemp(decode) / "b"
        assert run_cli("build", "--source", "imagefolder", "--root", root, "--out", out[decode], *TEST_ENCODER,
                       "--workers", "0", "--batch-size", "16", "--decode", decode, "--until", "embed") == 0
    return root, out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return make_builds(tmp_path_factory)


def test_the_index_writes_what_a_full_decode_says_of_every_file(builds):
    root, out = builds
    index = pq.read_table(out["pillow"] / "index.parquet").to_pandas().set_index("key")
    quarantine = {r["key"]: r["error"] for r in pq.read_table(out["pillow"] / "quarantine.parquet").to_pylist()}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == len(index) + len(quarantine) - 1  # the file broken behind its header is in both
    for path in files:
        key = path.relative_to(root).as_posix()
        expected = full_decode(path.read_bytes())
        if key == "c1/bad_behind_header.jpg":
            assert isinstance(expected, str) and "corrupt" in expected
            assert key in index.index  # the header vouched for it ...
            assert quarantine[key] == expected  # ... and the embed stage, decoding it, quarantined it
        elif isinstance(expected, str):
            assert key not in index.index and quarantine[key] == expected, key
        else:
            row = index.loc[key]
            assert (row.width, row.height, row.format) == expected, key
            assert key not in quarantine
    assert tuple(index.loc["c0/odd_exif_rotated.jpg", ["width", "height"]]) == (32, 64)  # turned upright


def test_a_header_vouches_only_for_a_whole_jpeg(builds):
    root, _ = builds
    broken = (root / "c1" / "bad_behind_header.jpg").read_bytes()
    assert check_image(broken).format == "JPEG"  # not decoded: the header is sound
    with pytest.raises(BadImage, match="truncated"):  # no end marker: decoded, and the loader's reason
        check_image((root / "c1" / "bad_truncated.jpg").read_bytes())
    assert check_image((root / "c2" / "padded.jpg").read_bytes()).width == 96


def test_a_file_broken_behind_its_header_is_never_mined_and_stays_quarantined(builds, tmp_path):
    _, out = builds
    build = tmp_path / "b"
    shutil.copytree(out["pillow"], build)
    assert run_cli("build", "--source", "imagefolder", "--root", builds[0], "--out", build, *TEST_ENCODER,
                   "--workers", "0", "--batch-size", "16", "--decode", "pillow", "--min-similarity", "0",
                   "--until", "mine") == 0
    index = pq.read_table(build / "index.parquet").to_pandas().set_index("key")
    broken_id = int(index.loc["c1/bad_behind_header.jpg", "id"])
    pairs = pq.read_table(build / "pairs.parquet").to_pandas()
    assert len(pairs) and broken_id not in set(pairs.anchor_id) | set(pairs.positive_id)
    keys = pq.read_table(build / "quarantine.parquet").column("key").to_pylist()
    assert keys.count("c1/bad_behind_header.jpg") == 1


def embeddings(build: Path) -> dict[str, np.ndarray]:
    emb = build / "embeddings"
    vecs = {}
    for c in sorted(int(p.name[6:11]) for p in emb.glob("chunk-?????.npy")):
        rows = np.load(chunk_paths(emb, c)[0]).astype(np.float32)
        keys = pq.read_table(chunk_keys_path(emb, c)).column("key").to_pylist()
        vecs.update(zip(keys, rows))
    return vecs


def test_device_decoding_gives_the_embeddings_of_the_pillow_path(builds):
    same_embeddings_on_both_paths(builds)


def same_embeddings_on_both_paths(builds: tuple[Path, dict[str, Path]]) -> None:
    """The device path's embeddings against the Pillow path's (``tests/test_cuda.py`` runs it on the device)."""
    _, out = builds
    pil, dev = embeddings(out["pillow"]), embeddings(out["device"])
    assert pil.keys() == dev.keys()
    cos = {k: float(pil[k] @ dev[k]) for k in pil if pil[k].any()}
    assert np.median(list(cos.values())) >= 0.99
    distinct = [k for k in cos if "odd_" not in k and "padded" not in k]  # the rest are copies of one picture
    across = np.stack([dev[k] for k in distinct]) @ np.stack([pil[k] for k in distinct]).T
    assert (across.argmax(axis=1) == np.arange(len(distinct))).all()  # nearer its own than any other picture
    for key in ("c0/odd_cmyk.jpg", "c0/odd_exif_rotated.jpg", "c0/odd_png_named_jpeg.JPEG"):
        np.testing.assert_array_equal(pil[key], dev[key])  # the device decoder does not take these: Pillow did
    quarantined = [pq.read_table(out[d] / "quarantine.parquet").to_pylist() for d in ("pillow", "device")]
    assert quarantined[0] == quarantined[1]


@pytest.mark.parametrize("encoder", ["openclip", "trainer"])
def test_tensor_preprocessing_gives_the_pictures_of_the_pillow_path(builds, encoder):
    """Up to resampling: each picture of the device path correlates >= 0.99 with its Pillow picture, and more
    than with any other picture of the corpus."""
    root, _ = builds
    if encoder == "openclip":
        preprocess, size = load_encoder("openclip:ViT-S-32", 64).preprocess, 64
    else:
        preprocess, size = eval_transform(48), 48
    tensor = tensor_preprocess(preprocess)
    assert tensor is not None
    source = ImageFolderSource(str(root))
    keys = [k for k, _ in source.items() if "/bad_" not in k]
    dataset = _IndexedImages(source, keys, preprocess, size, device_decode=True)
    items = [dataset[i] for i in range(len(keys))]
    assert sum(j for _, _, j, _ in items) > len(keys) // 2  # most went to the device decoder
    device, reasons, described = device_batch(_collate_mixed(items), tensor, preprocess, size, dataset.draft_size,
                                   torch.device("cpu"))
    pillow_path = _IndexedImages(source, keys, preprocess, size)
    pillow_items = [pillow_path[i] for i in range(len(keys))]
    pillow = torch.stack([item[0] for item in pillow_items])
    assert not any(reasons)
    # the copy descriptors made on the device path are those of the Pillow path, up to resampling
    on_pillow = np.stack([item[3] for item in pillow_items]).astype(np.float32)
    assert described.shape == on_pillow.shape and described.any(axis=1).all()
    assert np.abs(described.astype(np.float32) - on_pillow).mean() < 4.0
    corr = torch.corrcoef(torch.cat([device.flatten(1), pillow.flatten(1)]))[: len(keys), len(keys):]
    assert torch.diagonal(corr).min() >= 0.99
    distinct = [i for i, k in enumerate(keys) if "odd_" not in k and "padded" not in k]  # the rest are copies
    mine = corr[distinct][:, distinct].argmax(dim=1)
    assert (mine == torch.arange(len(distinct))).all()



def test_changing_the_decode_path_embeds_again_and_mixes_no_chunks(builds, tmp_path):
    _, out = builds
    build = tmp_path / "b"
    shutil.copytree(out["device"], build)
    assert run_cli("embed", build, "--decode", "pillow") == 0
    again, pil = embeddings(build), embeddings(out["pillow"])
    assert again.keys() == pil.keys()
    for key in pil:  # every row encoded again on the Pillow path: exactly the Pillow build's rows
        np.testing.assert_array_equal(again[key], pil[key])
    meta = (build / "embeddings" / "meta.json").read_text()
    assert '"decode": "Pillow"' in meta


def test_every_device_decode_waits_for_the_queued_work_first(monkeypatch):
    """The nvJPEG barrier (vision PR #9606) sits in the call the embed stage's device path makes: each decoder
    call on a CUDA device, batched or one by one after a refused file, comes after the stream was drained.
    Run here with torch's stream and torchvision's decoder replaced by recorders (this machine has no GPU);
    ``tests/test_cuda.py`` runs the real harness on one."""
    import torchvision.io

    from spp_curate import images
    from spp_curate.curate import embed

    assert embed.decode_jpegs is images.decode_jpegs  # what device_batch calls
    events: list[str] = []

    class Stream:
        def synchronize(self):
            events.append("drain")

    real = torchvision.io.decode_jpeg

    def recording_decoder(data, mode, device):
        events.append("decode")
        if isinstance(data, list) and len(data) > 1:
            raise RuntimeError("one refused file fails the batch")
        return real(data, mode=mode, device="cpu")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", recording_decoder)
    pictures = [jpeg_bytes(img) for _, img in fmnist_pictures(1)]
    decoded = images.decode_jpegs([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in pictures], "cuda")
    assert len(decoded) == 3 and all(d is not None for d in decoded)
    assert events == ["drain", "decode"] * 4  # the batch, then each file alone
    events.clear()
    images.decode_jpegs([torch.frombuffer(bytearray(pictures[0]), dtype=torch.uint8)], "cpu")
    assert events == ["decode"]  # nothing to drain on a CPU
