"""The GPU paths on a CUDA device: the nvJPEG barrier, device decoding, exact search, resume and eval.

Where torch sees no CUDA device every test runs in its CPU form (``SPP_CURATE_CUDA_TESTS=cpu``, the
default), so a CUDA test cannot rot unseen in a suite that has no GPU: on the CPU the comparisons are of the
CPU with itself, which proves the code runs, not that CUDA agrees. ``SPP_CURATE_CUDA_TESTS=required`` turns
a missing device into a failure (``bench/device_check.py`` sets it on a GPU machine, so a broken CUDA set-up
cannot pass), ``skip`` skips them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spp_curate.images import decode_image, decode_jpegs

from conftest import FMNIST, run_cli

MODE = os.environ.get("SPP_CURATE_CUDA_TESTS", "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if MODE == "required":
        pytest.fail("SPP_CURATE_CUDA_TESTS=required, but torch sees no CUDA device "
                    f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if MODE == "cpu":
        return torch.device("cpu")
    pytest.skip(f"no CUDA device and SPP_CURATE_CUDA_TESTS={MODE} (cpu rehearses these tests on the CPU)")


def photo_jpegs(n: int, side: int = 512) -> list[bytes]:
    """``n`` different JPEG crops of one size from a real photograph."""
    import matplotlib

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x, y = int(rng.integers(0, photo.width - side // 2)), int(rng.integers(0, photo.height - side // 2))
        crop = photo.crop((x, y, x + side // 2, y + side // 2)).resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        out.append(buf.getvalue())
    return out


def as_tensors(files: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]


def test_the_decode_barrier_keeps_queued_reductions_intact(device):
    """The harness of pytorch/vision PR #9606, through our own decode call: queue heavy work, then a reduction
    of a tensor, free that tensor while its reduction is still queued, decode a batch (whose output may be given
    the freed block), and check every reduction. Without the barrier an H100 corrupted 134 of 200."""
    iterations = 200 if device.type == "cuda" else 4
    files = as_tensors(photo_jpegs(16))
    numel = 3 * 512 * 512 // 4  # a float32 tensor of one decoded picture's bytes, so the allocator may reuse it
    heavy = torch.randn(2048 if device.type == "cuda" else 256, 2048 if device.type == "cuda" else 256,
                        device=device)
    sums, expected = [], []
    for i in range(iterations):
        value = float(i % 7 + 1)
        victim = torch.full((numel,), value, device=device)
        work = heavy
        for _ in range(8):  # keeps the stream busy, so the reduction below is still queued at the decode
            work = torch.tanh(work @ heavy)
        sums.append(victim.sum() + work.sum() * 0)
        expected.append(value * numel)
        del victim
        decode_jpegs(files, device)
    got = torch.stack(sums).cpu().numpy()
    corrupted = int(np.sum(got != np.asarray(expected, dtype=np.float32)))
    assert corrupted == 0, f"{corrupted} of {iterations} reductions corrupted by the decoder"


def test_a_batch_decoded_beside_queued_work_equals_the_cpu_decode(device):
    files = photo_jpegs(24)
    busy = torch.randn(1024, 1024, device=device)
    for _ in range(4):
        busy = torch.tanh(busy @ busy)
    decoded = decode_jpegs(as_tensors(files), device)
    assert busy.isfinite().all()
    for data, pic in zip(files, decoded):
        ref = np.asarray(decode_image(data), dtype=np.int16)
        got = pic.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        # nvJPEG and libjpeg-turbo may round the inverse DCT and the upsampling differently
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (diff.mean(), diff.max())


def test_device_decoding_and_tensor_preprocessing_match_the_pillow_path(device, tmp_path_factory):
    """The whole device path of the embed stage (batched decode, tensor preprocessing) against the Pillow path,
    on real photos and the odd-file corpus: median cosine >= 0.99, odd files routed to Pillow."""
    from test_decode_once import make_builds
    from test_decode_once import same_embeddings_on_both_paths

    same_embeddings_on_both_paths(make_builds(tmp_path_factory))


def test_exact_search_on_the_device_equals_faiss_flat(device, none_build):
    from spp_curate.engine.local import LocalEngine
    from spp_curate.layout import load_embeddings
    from spp_curate.pairing.knn import SearchPlan
    from spp_curate.pairing.mine import raw_candidates

    vecs, _ = load_embeddings(none_build, dtype=np.float16)
    groups = [np.arange(len(vecs))]
    flat = raw_candidates(vecs, groups, 8, LocalEngine(), [SearchPlan("flat")])
    on_device = raw_candidates(vecs, groups, 8, LocalEngine(),
                               [SearchPlan("flat", device=device.type, backend="torch")])
    assert np.array_equal(flat.anchor, on_device.anchor)
    assert np.abs(flat.similarity - on_device.similarity).max() < 1e-4
    assert np.mean(flat.positive == on_device.positive) > 0.99


def test_the_bfloat16_search_and_its_roofline_pass_on_the_device(device, none_build):
    """The exact search in bfloat16 (blocks sized to the device's free memory) finds what faiss finds, scored
    again in float32; the matmul-only pass the benchmark times it against runs the same blocks and returns
    nothing."""
    import faiss

    from spp_curate.layout import load_embeddings
    from spp_curate.pairing.knn import knn_blocks, torch_knn

    vecs, _ = load_embeddings(none_build, dtype=np.float32)
    query_batch, column_block = knn_blocks(len(vecs), device.type)
    assert query_batch >= 2048 and column_block >= 4096
    sims, pos = torch_knn(vecs, 9, device.type, dtype="bfloat16")
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs))
    truth_s, truth = index.search(np.ascontiguousarray(vecs), 9)
    assert np.abs(sims[:, 0] - truth_s[:, 0]).max() < 1e-3  # scored again in float32
    assert np.abs(sims - truth_s).mean() < 1e-3  # the k found are the k best, up to bfloat16's near-ties
    assert np.mean(pos == truth) > 0.95
    empty_s, empty_p = torch_knn(vecs, 9, device.type, dtype="bfloat16", matmul_only=True)
    assert empty_s.shape == (0, 9) and empty_p.shape == (0, 9)


def test_faiss_on_the_gpu_equals_faiss_on_the_cpu(device, none_build):
    import faiss

    from spp_curate.layout import load_embeddings

    if faiss.get_num_gpus() == 0:
        pytest.skip(f"faiss {faiss.__version__} sees no GPU (faiss-cpu installed; the torch search above runs)")
    vecs, _ = load_embeddings(none_build, dtype=np.float32)
    cpu = faiss.IndexFlatIP(vecs.shape[1])
    cpu.add(vecs)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    s_cpu, i_cpu = cpu.search(vecs, 9)
    s_gpu, i_gpu = gpu.search(vecs, 9)
    assert np.abs(s_cpu - s_gpu).max() < 1e-4
    assert np.mean(i_cpu == i_gpu) > 0.99


def test_an_embed_stage_killed_on_the_device_resumes_to_identical_chunks(device, label_build, tmp_path):
    from test_stages import embed_killed_and_resumed

    embed_killed_and_resumed(tmp_path)


def test_the_trainer_resumed_on_the_device_ends_with_the_weights_of_an_uninterrupted_run(device, label_build,
                                                                                         tmp_path):
    from test_trainer import resumed_equals_straight

    for options in ({}, {"positive_loss": "in", "support": 96}):
        resumed_equals_straight(label_build, tmp_path / f"options-{len(options)}", options)


def test_eval_on_the_device_is_within_half_a_point_of_eval_on_the_cpu(device, label_build, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--out", run, "--pairs", label_build / "release", "--method", "simclr",
                   "--positives", "both", "--epochs", "1", "--limit", "256", "--batch-size", "64") == 0
    assert run_cli("eval", run, "--source", "fashion-mnist", "--root", FMNIST, "--limit", "1000") == 0
    on_device = json.loads((run / "eval.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "spp_curate.cli", "eval", str(run), "--source", "fashion-mnist",
                           "--root", str(FMNIST), "--limit", "1000"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    on_cpu = json.loads((run / "eval.json").read_text())
    for metric in ("knn_top1", "linear_top1", "pixel_knn_top1"):
        assert abs(on_device[metric] - on_cpu[metric]) <= 0.005, (metric, on_device[metric], on_cpu[metric])
