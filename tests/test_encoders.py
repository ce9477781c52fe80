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


# --- encoders by the names their libraries use -------------------------------------------------------------

X32 = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)


def _open_clip_folder(folder, seed: int = 7):
    """open_clip's own layout for a published model: open_clip_config.json and open_clip_model.safetensors."""
    import json

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-S-32", force_image_size=32)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config("ViT-S-32")
    cfg["vision_cfg"]["image_size"] = 32
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model.eval()


def test_openclip_local_dir_and_hf_hub_names_load_offline(tmp_path, monkeypatch):
    model = _open_clip_folder(tmp_path / "local")
    with torch.inference_mode():
        want = model.encode_image(X32).numpy()
    enc = load_encoder(f"openclip:local-dir:{tmp_path / 'local'}")
    with torch.inference_mode():
        assert np.allclose(enc(X32).numpy(), want, atol=1e-5)
    assert enc.meta["weights"].startswith("local-dir:")
    # the same files in a Hub cache laid out as huggingface_hub lays it out, read with the Hub offline
    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-clip" / "snapshots" / ("0" * 40)
    _open_clip_folder(snapshot)
    (cache / "models--someorg--tiny-clip" / "refs").mkdir()
    (cache / "models--someorg--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    enc = load_encoder("openclip:hf-hub:someorg/tiny-clip")
    with torch.inference_mode():
        assert np.allclose(enc(X32).numpy(), want, atol=1e-5)
    assert enc.meta["weights"] == "hf-hub:someorg/tiny-clip"
    with pytest.raises(UserError, match="is not in the Hugging Face cache"):
        load_encoder("openclip:hf-hub:someorg/not-cached")


def test_timm_backbones_by_name_with_random_or_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    from spp_curate.curate.encoders import tensor_preprocess

    enc = load_encoder("timm:resnet10t:random", image_size=32)
    assert enc.dim == 512 and enc.meta["weights"] == "random-init" and tensor_preprocess(enc.preprocess) is not None
    torch.manual_seed(5)
    model = timm.create_model("resnet10t", num_classes=0).eval()
    save_file(model.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    enc = load_encoder(f"timm:resnet10t:{tmp_path / 'resnet10t.safetensors'}", image_size=32)
    with torch.inference_mode():
        assert np.allclose(enc(X32).numpy(), model(X32).numpy(), atol=1e-5)
    assert enc.meta["weights"] == "file:resnet10t.safetensors"
    with pytest.raises(UserError, match="unknown timm model"):
        load_encoder("timm:no_such_net")
    with pytest.raises(UserError, match="give a local file"):
        load_encoder("timm:resnet10t")  # the Hub's weights, unreachable here


def _moco_checkpoint(path, arch: str = "resnet50", prefix: str = "module.encoder_q.", seed: int = 3):
    """A checkpoint as the official MoCo v2 script writes it: the query encoder under ``module.encoder_q.``,
    its MLP projection head (``fc.0``, ``fc.2``), the key encoder and the queue beside it."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None)
    state = {f"{prefix}{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    dim = net.fc.in_features
    state.update({f"{prefix}fc.0.weight": torch.randn(dim, dim), f"{prefix}fc.0.bias": torch.zeros(dim),
                  f"{prefix}fc.2.weight": torch.randn(128, dim), f"{prefix}fc.2.bias": torch.zeros(128),
                  "module.queue": torch.randn(128, 64), "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7)})
    torch.save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": {"lr": 0.03}}, path)
    net.fc = torch.nn.Identity()
    return net.eval()


def test_a_moco_v2_checkpoint_gives_the_features_of_the_resnet_it_holds(tmp_path):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    net = _moco_checkpoint(path)
    enc = load_encoder(f"torchvision:resnet50:{path}", image_size=32)
    assert enc.dim == 2048 and enc.meta["key_prefix"] == "module.encoder_q."
    with torch.inference_mode():
        assert np.allclose(enc(X32).numpy(), net(X32).numpy(), atol=1e-4)
    # solo-learn's and lightly's "backbone." prefix, and a plain state_dict
    import torchvision

    torch.manual_seed(9)
    small = torchvision.models.resnet18()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in small.state_dict().items() if not k.startswith("fc.")}},
               tmp_path / "solo.ckpt")
    torch.save(small.state_dict(), tmp_path / "plain.pth")
    small.fc = torch.nn.Identity()
    with torch.inference_mode():
        want = small.eval()(X32).numpy()
        for name in ("solo.ckpt", "plain.pth"):
            got = load_encoder(f"torchvision:resnet18:{tmp_path / name}", image_size=32)(X32).numpy()
            assert np.allclose(got, want, atol=1e-4), name


def test_a_checkpoint_that_does_not_fit_names_the_keys_and_loads_nothing(tmp_path):
    path = tmp_path / "moco.pth.tar"
    _moco_checkpoint(path, arch="resnet18", prefix="module.weird_name.")
    with pytest.raises(UserError, match="--encoder-prefix") as err:
        load_encoder(f"torchvision:resnet18:{path}", image_size=32)
    assert "\n" not in str(err.value)
    enc = load_encoder(f"torchvision:resnet18:{path}", image_size=32, prefix="module.weird_name.")
    assert enc.meta["key_prefix"] == "module.weird_name."
    with pytest.raises(UserError, match="weights missing"):  # a given prefix that covers only part of the net
        load_encoder(f"torchvision:resnet18:{path}", image_size=32, prefix="module.weird_name.layer1.")
    with pytest.raises(UserError, match="does not fit resnet50"):  # the right prefix, the wrong architecture
        load_encoder(f"torchvision:resnet50:{path}", image_size=32, prefix="module.weird_name.")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(UserError, match="is not a weights file"):
        load_encoder(f"torchvision:resnet18:{tmp_path / 'evil.pth'}")


@pytest.mark.parametrize("kind", ["torchvision:resnet18", "timm:resnet10t", "openclip:ViT-S-32"])
def test_a_pickle_that_would_run_code_is_refused_in_words_of_ours(tmp_path, capsys, kind):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        load_encoder(f"{kind}:{tmp_path / 'evil.pt'}", image_size=32)
    message = str(err.value)
    assert "asks to run print; refused, nothing was run" in message, message
    assert "weights_only" not in message and "offline" not in message and "\n" not in message
    assert "code ran" not in capsys.readouterr().out


def test_openclip_weights_of_another_model_are_named_as_such(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError) as err:
        load_encoder(f"openclip:ViT-S-32:{tmp_path / 'other.pt'}", image_size=32)
    message = str(err.value)
    assert "do not fit ViT-S-32" in message and "offline" not in message and "\n" not in message, message


@pytest.mark.parametrize("spec", ["timm:resnet10t:random", "torchvision:resnet18:MOCO", "openclip:local-dir:DIR"])
def test_every_encoder_kind_builds_a_release_from_the_subset(tmp_path, spec):
    import json

    from conftest import FMNIST, run_cli

    if "MOCO" in spec:
        _moco_checkpoint(tmp_path / "moco.pth.tar", arch="resnet18")
        spec = spec.replace("MOCO", str(tmp_path / "moco.pth.tar"))
    if "DIR" in spec:
        _open_clip_folder(tmp_path / "clip")
        spec = spec.replace("DIR", str(tmp_path / "clip"))
    out = tmp_path / "b"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "300",
                   "--encoder", spec, "--image-size", "32", "--workers", "0", "--category", "label",
                   "--min-similarity", "0", "--dup-threshold", "0.9999") == 0
    meta = json.loads((out / "embeddings" / "meta.json").read_text())
    assert meta["model"]["weights"] in ("random-init", "file:moco.pth.tar", f"local-dir:{tmp_path / 'clip'}")
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] > 0 and manifest["recipe"]["encoder"] == spec


def test_raw_pixels_mine_same_class_neighbours_at_the_size_they_name(tmp_path):
    """``pixels:SIZE``: the picture itself as the embedding (no weights); on the Fashion-MNIST subset its
    neighbours are of the anchor's class far more often than chance (a tenth)."""
    import json

    from conftest import FMNIST, run_cli
    from spp_curate.config import resolve_recipe

    assert resolve_recipe("fashion-mnist", {"encoder": "pixels:16"}).image_size is None  # not the manifest's 64
    encoder = load_encoder("pixels:16")
    assert (encoder.dim, encoder.image_size) == (768, 16)
    out = tmp_path / "b"
    assert run_cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", out, "--limit", "300",
                   "--encoder", "pixels:16", "--workers", "0", "--category", "none", "--min-similarity", "q0",
                   "--max-per-anchor", "1") == 0
    meta = json.loads((out / "embeddings" / "meta.json").read_text())
    assert meta["dim"] == 768 and meta["model"]["image_size"] == 16 and "raw pixels" in meta["model"]["output"]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["pairs"] > 100 and metrics["precision"] > 0.5, metrics["precision"]


def test_weights_holding_nan_are_one_line_before_anything_is_embedded(tmp_path, cli):
    import timm

    from conftest import FMNIST

    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    spec = f"timm:resnet10t:{tmp_path / 'nan.pt'}"
    with pytest.raises(UserError, match=r"hold NaN or inf \(first in layer2\.0\.conv1\.weight\)"):
        load_encoder(spec, image_size=32)
    proc = cli("build", "--source", "fashion-mnist", "--root", FMNIST, "--out", tmp_path / "b", "--encoder", spec,
               "--image-size", "32", "--limit", "64", "--workers", "0")
    assert proc.returncode == 2 and "hold NaN or inf" in proc.stderr and "category" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b" / "embeddings" / "meta.json").exists()
