"""Hostile weights and stored scales: for each weights kind, files that load nothing, hold the wrong tensors, run
code, claim huge sizes, hold inf/NaN or a zero std each end in exit 2 with one line naming ``--encoder`` (or
``--whiten``), before anything is embedded; never in a build with random weights."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import said_lines
from images import write_imagefolder


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights") / "images"
    write_imagefolder(root, per_class=3, odd=False, broken=False)
    return root


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def _timm_state(name: str = "resnet10t") -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(1)
    return timm.create_model(name, num_classes=0).state_dict()


def _torchvision_state(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(2)
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = torch.nn.Identity()
    return model.state_dict()


def _poisoned(state: dict[str, torch.Tensor], name: str, value: float, path):
    """``state`` saved at ``path`` with the first number of tensor ``name`` set to ``value`` (NaN or inf)."""
    state[name].view(-1)[0] = value
    torch.save(state, path)
    return path


def _huge_safetensors(path):
    """A safetensors file whose header claims a tensor far larger than the file."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [768, 2 ** 24], "data_offsets": [0, 768 * 2 ** 26]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def _open_clip_dir(folder, weights: bool = True, std=None, weights_name="open_clip_model.safetensors", evil=False):
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config("ViT-S-32")
    cfg["vision_cfg"]["image_size"] = 32
    pre = {} if std is None else {"mean": [0.5, 0.5, 0.5], "std": std}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    if evil:
        (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps({"state_dict": Payload()}))
    elif weights:
        torch.manual_seed(7)
        model = open_clip.create_model("ViT-S-32", force_image_size=32)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights_name))
    return folder


def _hostile_encoders(tmp):
    """(name, encoder string, what the one line must say) for every weights kind."""
    cases = []
    # timm
    torch.save({"foo": torch.zeros(3)}, tmp / "foo.pt")
    cases.append(("timm-foo", f"timm:resnet10t:{tmp / 'foo.pt'}", "weights missing"))
    torch.save(_timm_state("resnet18"), tmp / "resnet18.pt")
    cases.append(("timm-other-net", f"timm:resnet10t:{tmp / 'resnet18.pt'}", "does not fit"))
    vit = _timm_state("vit_tiny_patch16_224")
    torch.save(vit, tmp / "vit.pt")
    cases.append(("timm-vit-weights", f"timm:resnet10t:{tmp / 'vit.pt'}", "does not fit"))
    torch.save({"state_dict": Payload()}, tmp / "evil.pt")
    cases.append(("timm-pickle", f"timm:resnet10t:{tmp / 'evil.pt'}", "refused, nothing was run"))
    _huge_safetensors(tmp / "huge.safetensors")
    cases.append(("timm-huge-header", f"timm:resnet10t:{tmp / 'huge.safetensors'}", "not a weights file"))
    cases.append(("timm-missing", f"timm:resnet10t:{tmp / 'absent.pt'}", "no weights file"))
    nan = _poisoned(_timm_state(), "layer2.0.conv1.weight", float("nan"), tmp / "nan.pt")
    cases.append(("timm-nan", f"timm:resnet10t:{nan}", "NaN or inf"))
    inf_var = _poisoned(_timm_state(), "layer1.0.bn1.running_var", float("inf"), tmp / "inf_var.pt")
    cases.append(("timm-inf-running-var", f"timm:resnet10t:{inf_var}", "NaN or inf (first in "
                                                                        "layer1.0.bn1.running_var)"))
    # torchvision
    cases.append(("torchvision-foo", f"torchvision:resnet18:{tmp / 'foo.pt'}", "no key prefix"))
    state = {f"module.encoder_q.{k}": v for k, v in _torchvision_state().items() if not k.startswith("layer4")}
    torch.save({"state_dict": state}, tmp / "moco_no_layer4.pt")
    cases.append(("torchvision-missing-layer4", f"torchvision:resnet18:{tmp / 'moco_no_layer4.pt'}",
                  "under prefix 'module.encoder_q.' (the best of the known prefixes)"))
    cases.append(("torchvision-pickle", f"torchvision:resnet18:{tmp / 'evil.pt'}", "refused, nothing was run"))
    tv_inf = _poisoned(_torchvision_state(), "bn1.running_var", float("inf"), tmp / "tv_inf.pt")
    cases.append(("torchvision-inf-running-var", f"torchvision:resnet18:{tv_inf}", "NaN or inf"))
    cases.append(("torchvision-vit-too-small", "torchvision:vit_b_16:random", "--image-size: vit_b_16 cannot take 32 px"))
    cases.append(("torchvision-huge-header", f"torchvision:resnet18:{tmp / 'huge.safetensors'}", "not a weights file"))
    cases.append(("torchvision-missing", f"torchvision:resnet18:{tmp / 'absent.pt'}", "no weights file"))
    tv_nan = _poisoned(_torchvision_state(), "layer3.0.conv2.weight", float("nan"), tmp / "tv_nan.pt")
    cases.append(("torchvision-nan", f"torchvision:resnet18:{tv_nan}", "NaN or inf"))
    # open_clip
    cases.append(("openclip-file-foo", f"openclip:ViT-S-32:{tmp / 'foo.pt'}", "do not fit"))
    cases.append(("openclip-file-pickle", f"openclip:ViT-S-32:{tmp / 'evil.pt'}", "refused, nothing was run"))
    cases.append(("openclip-file-huge-header", f"openclip:ViT-S-32:{tmp / 'huge.safetensors'}", "not a weights file"))
    cases.append(("openclip-file-missing", f"openclip:ViT-S-32:{tmp / 'absent.pt'}", "neither a file nor a pretrained tag"))
    import open_clip

    torch.manual_seed(3)
    clip_inf = _poisoned(open_clip.create_model("ViT-S-32", force_image_size=32).state_dict(), "visual.conv1.weight",
                         float("inf"), tmp / "clip_inf.pt")
    cases.append(("openclip-file-inf", f"openclip:ViT-S-32:{clip_inf}", "NaN or inf"))
    cases.append(("openclip-dir-no-weights", f"openclip:local-dir:{_open_clip_dir(tmp / 'noweights', weights=False)}",
                  "no weights file"))
    cases.append(("openclip-dir-pickle-bin", f"openclip:local-dir:{_open_clip_dir(tmp / 'evilbin', evil=True)}",
                  "is not a weights file"))
    cases.append(("openclip-dir-zero-std", f"openclip:local-dir:{_open_clip_dir(tmp / 'zerostd', std=[0])}",
                  "std"))
    (tmp / "foreign").mkdir()
    torch.save({"foo": torch.zeros(3)}, tmp / "foreign" / "open_clip_pytorch_model.bin")
    (tmp / "foreign" / "open_clip_config.json").write_text((tmp / "noweights" / "open_clip_config.json").read_text())
    cases.append(("openclip-dir-foreign-tensors", f"openclip:local-dir:{tmp / 'foreign'}", "do not fit"))
    return cases


def test_every_hostile_weights_file_is_one_line_naming_encoder_and_embeds_nothing(tmp_path, tiny_root, cli,
                                                                                    capsys):
    cases = _hostile_encoders(tmp_path)
    assert len(cases) >= 25  # every weights kind: wrong tensors, missing, pickles, huge headers, inf/NaN
    failures = []
    for name, spec, says in cases:
        out = tmp_path / f"b-{name}"
        proc = cli("build", "--source", "imagefolder", "--root", tiny_root, "--out", out, "--encoder", spec,
                   "--image-size", "32", "--workers", "0", "--until", "embed")
        lines = said_lines(proc.stderr)
        last = lines[-1] if lines else ""
        named = "--encoder" in last or "--image-size: " in last  # a net that cannot take the size names that
        if proc.returncode != 2 or not named or says not in last or (out / "embeddings").exists():
            failures.append((name, proc.returncode, lines[-2:]))
        if "weights_only" in proc.stderr or "Traceback" in proc.stderr:
            failures.append((name, "torch's advice or a traceback", lines[-2:]))
    assert "code ran" not in capsys.readouterr().out
    assert not failures, "\n".join(map(str, failures))


def test_a_hub_cache_holding_only_the_config_is_refused_not_random(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from spp_curate.curate.encoders import load_encoder
    from spp_curate.errors import UserError

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--config-only" / "snapshots" / ("0" * 40)
    _open_clip_dir(snapshot, weights=False)
    (cache / "models--someorg--config-only" / "refs").mkdir()
    (cache / "models--someorg--config-only" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_encoder("openclip:hf-hub:someorg/config-only")
    assert "--encoder" in str(err.value) and "open_clip_model.safetensors" in str(err.value), str(err.value)


def test_timm_weights_saved_with_their_classifier_still_load_strictly(tmp_path):
    """A classifier checkpoint (timm's own: head included) loads into the backbone; the head is left out by
    name, every other tensor matched."""
    import timm

    from spp_curate.curate.encoders import load_encoder

    torch.manual_seed(4)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "with_head.pt")
    enc = load_encoder(f"timm:resnet10t:{tmp_path / 'with_head.pt'}", image_size=32)
    model.reset_classifier(0)
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(enc(x), model(x), atol=1e-5)


def test_a_pretrained_encoder_offline_fails_in_the_preflight_in_whole_words(tmp_path, tiny_root):
    """The README's headline encoder offline: one line before any stage runs (no index), no message cut mid-word,
    no ERROR:root: line repeating it."""
    from conftest import run_cli_process

    out = tmp_path / "b"
    proc = run_cli_process("build", "--source", "imagefolder", "--root", tiny_root, "--out", out,
                           "--encoder", "openclip:ViT-B-32:laion2b_s34b_b79k",
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    lines = said_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --encoder:") and "local file" in lines[0]
    assert "ERROR:root" not in proc.stderr and not out.exists()
    assert not lines[0].rstrip(")").endswith(("Last er", "er"))


def test_a_message_is_never_cut_mid_word():
    from spp_curate.errors import brief

    text = "Failed to download file (open_clip_pytorch_model.bin) for laion/x. Last error: cannot reach the Hub"
    short = brief(text, 60)
    assert short.endswith(" …") and len(short) <= 62
    assert text.startswith(short[:-2]) and text[len(short) - 2] == " "
    assert brief(RuntimeError()) == "RuntimeError" and brief("a\nb  c") == "a b c"


# --- stored scales (--whiten keep) ---------------------------------------------------------------------------

def _npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _huge_header_npz(path):
    """A small .npz whose projection.npy header claims shape (768, 2**24) float32 (48 GiB)."""
    import io
    import zipfile

    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (768, 2 ** 24)})
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in (("kind", np.array("pca")), ("mean", np.zeros(192, np.float32)),
                          ("fitted_on", np.array("x"))):
            member = io.BytesIO()
            np.save(member, arr)
            zf.writestr(f"{name}.npy", member.getvalue())
        zf.writestr("projection.npy", buf.getvalue() + b"\0" * 4096)


def test_a_stored_scale_that_collapses_or_lies_about_its_size_is_one_line_naming_whiten(tmp_path, tiny_root, cli):
    from spp_curate.layout import WHITENING
    from spp_curate.pairing.whiten import Whitening

    out = tmp_path / "b"
    options = ["--source", "imagefolder", "--root", tiny_root, "--encoder", "pixels:8", "--workers", "0",
               "--category", "none", "--min-similarity", "q0"]
    assert cli("build", "--out", out, *options).returncode == 0
    good = Whitening.load(out / WHITENING)
    assert cli("build", "--out", out, *options, "--whiten", "keep").returncode == 0  # the real one applies
    base = {"kind": np.array("pca"), "mean": good.mean, "fitted_on": np.array(good.fitted_on)}
    hostile = {
        "zero-projection": ({**base, "projection": np.zeros_like(good.projection)}, "to zero"),
        "huge-entries": ({**base, "projection": np.full_like(good.projection, 3e38)}, "overflows"),
        "rank-one": ({**base, "projection": np.outer(good.projection[:, 0], np.ones(good.projection.shape[1]))
                      .astype(np.float32)}, "rank"),
        "far-mean": ({**base, "mean": good.mean + 1e6, "projection": good.projection}, "spread"),
        "string-mean": ({**base, "mean": np.array(["a"] * len(good.mean)), "projection": good.projection},
                        "not numbers"),
    }
    for name, (arrays, says) in hostile.items():
        _npz(out / WHITENING, **arrays)
        planted = (out / WHITENING).read_bytes()
        proc = cli("mine", out, "--force")
        last = said_lines(proc.stderr)[-1]
        assert proc.returncode == 2 and "--whiten" in last and says in last, (name, last)
        assert (out / WHITENING).read_bytes() == planted  # named, not applied, not deleted
    _huge_header_npz(out / WHITENING)
    proc = cli("mine", out, "--force")
    last = said_lines(proc.stderr)[-1]
    assert proc.returncode == 2 and "--whiten" in last and "claims shape (768, 16777216)" in last, last
