"""Encoder strings: random init is reproducible, local weight files load, unreachable weights say how to get them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_curate.curate.encoders import load_encoder
from spp_curate.errors import UserError

from conftest import run_cli_process


def _features(encoder) -> np.ndarray:
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.inference_mode():
        return encoder(x).numpy()


def test_random_init_is_the_same_every_time():
    a = load_encoder("openclip:ViT-S-32", image_size=32)
    b = load_encoder("openclip:ViT-S-32", image_size=32)
    assert np.array_equal(_features(a), _features(b))
    assert a.dim == 384 and a.image_size == 32


def test_local_weights_file_loads(tmp_path):
    import open_clip

    torch.manual_seed(123)
    model = open_clip.create_model("ViT-S-32", force_image_size=32)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    enc = load_encoder(f"openclip:ViT-S-32:{path}", image_size=32)
    assert enc.meta["weights"] == "file:weights.pt"
    with torch.inference_mode():
        x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
        assert np.allclose(enc(x).numpy(), model.eval().encode_image(x).numpy(), atol=1e-5)
    assert not np.allclose(_features(enc), _features(load_encoder("openclip:ViT-S-32", image_size=32)))


def test_unknown_tag_lists_the_tags():
    with pytest.raises(UserError, match="laion2b_s34b_b79k"):
        load_encoder("openclip:ViT-B-32:no_such_tag")


def test_unreachable_pretrained_weights_say_how_to_provide_them(tmp_path):
    proc = run_cli_process("build", "--source", "fashion-mnist", "--root", "tests/data/fashion-mnist",
                           "--out", tmp_path / "b", "--limit", "20", "--workers", "0",
                           "--encoder", "openclip:ViT-B-32:laion2b_s34b_b79k",
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "━" not in line and ":" in line]
    assert "--encoder" in lines[-1] and "local file" in lines[-1]
