"""The trainer's data path: pictures decoded once into a cache, read by row ranges, augmented in batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_curate.curate.sources import open_source
from spp_curate.config import resolve_recipe
from spp_curate.images import decode_image
from spp_curate.train.augment import DeviceAugment
from spp_curate.checkpoint import geometry
from spp_curate.train.cache import ReleaseReader, SourceReader, StreamReader, UNIT_IMAGES, decode_into, stream_rows
from spp_curate.train.data import TrainData, ViewMaker, pair_data, single_data

from images import broken_files, fmnist_pictures, odd_files, write_imagefolder


def test_device_augmentation_draws_parameters_per_picture():
    picture = torch.from_numpy(np.array(fmnist_pictures(1, classes=1, size=32)[0][1]))
    batch = picture.expand(16, *picture.shape).contiguous()  # sixteen copies of one picture
    augment = DeviceAugment(32)
    torch.manual_seed(3)
    first, second = augment(batch), augment(batch)
    assert first.shape == (16, 3, 32, 32) and first.dtype == torch.float32
    # each copy gets its own crop, flip and colours: no two rows alike, and two views of one picture differ
    rows = first.flatten(1)
    assert all(not torch.allclose(rows[i], rows[j]) for i in range(16) for j in range(i + 1, 16))
    assert all(not torch.allclose(first[i], second[i]) for i in range(16))
    # the same seed gives the same views
    torch.manual_seed(3)
    assert torch.equal(augment(batch), first)


def test_cached_pictures_are_the_ones_decode_image_gives(tmp_path):
    picture = fmnist_pictures(1, classes=1, size=64)[0][1]
    files = {**odd_files(picture), **{k: v for k, (v, _) in broken_files(picture).items()}}
    for name, data in files.items():
        (tmp_path / "odd" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "odd" / "a" / name).write_bytes(data)
    source = open_source(resolve_recipe("imagefolder", {"root": str(tmp_path / "odd")}))
    keys = [k for k, _ in source.items()]
    assert len(keys) == len(files)
    for workers in (0, 2):
        cache = decode_into(SourceReader(source, keys), 48, workers)
        for row, key in enumerate(keys):
            name = key.split("/")[-1]
            if name in odd_files(picture):
                expected = np.asarray(geometry(48)(decode_image(files[name], draft_size=48)))
                assert cache.ok[row] and np.array_equal(cache.pixels[row], expected), name
            else:
                assert not cache.ok[row] and not cache.pixels[row].any(), name
    # upright: the EXIF-rotated 64x32 crop decodes to a portrait picture, centre-cropped from 32x64
    exif = decode_image(files["exif_rotated.jpg"])
    assert exif.size == (32, 64)


def test_release_rows_read_by_many_workers_once_each(label_build, tmp_path):
    release = label_build / "release"
    reader = ReleaseReader(release)
    assert len(reader.pairs) == reader.count > 0
    # every picture is read once, from one unit, whatever the number of units
    rows = np.concatenate([unit[-1] for unit in reader.units()])
    assert np.array_equal(np.sort(rows), np.arange(len(reader.keys)))
    serial = decode_into(reader, 32, workers=0)
    parallel = decode_into(reader, 32, workers=3, mode="disk", spill_dir=tmp_path / "spill")
    assert (tmp_path / "spill" / "pixels-32.u8").exists()
    assert np.array_equal(serial.pixels, parallel.pixels) and serial.ok.all() and parallel.ok.all()
    # the streamed reader (the hf:// path) sees the same pairs and pictures
    stream = StreamReader(stream_rows(str(release)))
    streamed = decode_into(stream, 32, workers=2)
    order = {k: i for i, k in enumerate(stream.keys)}
    assert stream.keys == reader.keys and np.array_equal(stream.pairs, reader.pairs)
    assert np.array_equal(streamed.pixels[[order[k] for k in reader.keys]], serial.pixels)
    # an epoch uses every anchor exactly once, in a seeded order that changes with the epoch
    data = pair_data(str(release), 32, workers=2)
    epoch = [data.batches(64, seed=0, epoch=e) for e in (0, 1)]
    for batches in epoch:
        used = torch.cat(batches)
        assert len(used) == data.per_epoch and len(set(used.tolist())) == len(used)
        assert sorted(data.rows[used.numpy(), 0].tolist()) == sorted(set(data.rows[:, 0].tolist()))
    assert not torch.equal(torch.cat(epoch[0]), torch.cat(epoch[1]))
    assert torch.equal(torch.cat(data.batches(64, seed=0, epoch=0)), torch.cat(epoch[0]))


def test_more_workers_than_shards_all_get_units(label_build):
    reader = ReleaseReader(label_build / "release", limit=3 * UNIT_IMAGES // 2)
    assert len(reader.units()) >= 2  # one release shard, yet several units of work


def test_pairs_with_a_broken_picture_are_left_out_and_counted(tmp_path):
    write_imagefolder(tmp_path / "src", per_class=12)
    source = open_source(resolve_recipe("imagefolder", {"root": str(tmp_path / "src")}))
    keys = [k for k, _ in source.items()]
    bad = [i for i, k in enumerate(keys) if "/bad_" in k]
    data = single_data(source, 32, workers=2)
    assert sorted(np.flatnonzero(~data.cache.ok).tolist()) == bad
    assert data.skipped == len(bad) == 4 and len(data) == len(keys) - len(bad)
    assert not set(data.rows[:, 0].tolist()) & set(bad) and (data.rows[:, 1] == -1).all()
    assert data.cache.first_failure


@pytest.mark.parametrize("positives, views", [("augment", 2), ("semantic", 2), ("both", 3)])
def test_views_show_the_pair_their_mode_asks_for(label_build, positives, views):
    data = pair_data(str(label_build / "release"), 32, workers=0, limit=64)
    make = ViewMaker(data, positives, 32, torch.device("cpu"))
    batch = data.batches(16, seed=0, epoch=0)[0]
    v = make(batch)
    assert len(v.tensors) == views and all(t.shape == (16, 3, 32, 32) for t in v.tensors)
    a = make.ids[torch.from_numpy(data.rows[batch.numpy(), 0])]
    b = make.ids[torch.from_numpy(data.rows[batch.numpy(), 1])]
    assert torch.equal(v.images[0], a) and torch.equal(v.partners[0], b)
    if positives == "semantic":
        assert torch.equal(v.images[1], b) and torch.equal(v.partners[1], a)
    if positives == "both":
        assert torch.equal(v.images[2], b)


def test_an_epoch_draws_one_partner_per_anchor():
    # a release with several partners per anchor: each epoch uses every anchor once, with one of its
    # partners drawn; over epochs every partner is met; the draw is the seed's and the epoch's
    anchors = np.repeat(np.arange(10), [1, 2, 3, 4, 1, 2, 3, 4, 5, 1])
    rows = np.stack([anchors, (anchors + 1 + np.arange(len(anchors))) % 64], axis=1).astype(np.int64)
    data = TrainData(cache=None, rows=rows, skipped=0, unit="pair")  # the epoch plan reads the rows alone
    assert data.per_epoch == 10
    met = set()
    for epoch in range(40):
        rows = torch.cat(data.batches(4, seed=3, epoch=epoch)).numpy()
        assert sorted(data.rows[rows, 0].tolist()) == list(range(10))
        met.update(rows.tolist())
    assert met == set(range(len(anchors)))
    assert torch.equal(torch.cat(data.batches(4, seed=3, epoch=5)), torch.cat(data.batches(4, seed=3, epoch=5)))
    assert not all(torch.equal(torch.cat(data.batches(4, seed=3, epoch=e)), torch.cat(data.batches(4, seed=4, epoch=e)))
                   for e in range(3))
