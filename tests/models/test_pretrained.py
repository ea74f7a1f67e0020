"""Fine-tuning from pretrained weights: a saved base timm state dict loads through timm's
pretrained machinery into a +2-D SSM model whose new layers start at identity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import ssm2d

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deit_base(tmp_path_factory):
    """timm's deit_tiny_patch16_224 with random weights, saved as .safetensors and .pth."""
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (timm zero-inits the head)
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, folder / "deit_tiny.safetensors")
    torch.save(state, folder / "deit_tiny.pth")
    return base, folder


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_finetune_starts_at_the_base_model(deit_base, suffix):
    base, folder = deit_base
    model = ssm2d.create_model("deit_tiny_224_ssm2d", pretrained_file=folder / f"deit_tiny{suffix}").eval()
    layers = ssm2d.models.spatial_layers(model)
    assert len(layers) == 12 and all(isinstance(layer, ssm2d.SSM2D) for layer in layers)
    for layer in layers:  # the identity init: C = 0, skip 1
        assert torch.count_nonzero(layer.c_raw) == 0 and torch.all(layer.omega == 1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = base(x), model(x)
    assert (got - expected).abs().max() <= 1e-5
    assert expected.std() > 0.1  # the comparison is not between two near-zero outputs


def test_finetune_with_another_num_classes_reinitializes_the_head(deit_base):
    base, folder = deit_base
    torch.manual_seed(1)
    model = ssm2d.create_model("deit_tiny_224_ssm2d", pretrained_file=folder / "deit_tiny.safetensors", num_classes=7)
    model.eval()
    assert model.head.weight.shape == (7, 192)
    assert torch.count_nonzero(model.head.bias) == 0 and 0.01 < model.head.weight.std() < 0.03  # timm's head init
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = base.forward_head(base.forward_features(x), pre_logits=True)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert (got - features).abs().max() <= 1e-5
    assert torch.allclose(logits, features @ model.head.weight.T + model.head.bias, atol=1e-5)


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_file: expected .* at .*missing.safetensors"):
        ssm2d.create_model("deit_tiny_224_ssm2d", pretrained_file=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="vit_mini_28_ssm2d has no published weights; pass pretrained_file"):
        ssm2d.create_model("vit_mini_28_ssm2d", pretrained=True)


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}


def test_pretrained_offline_without_the_weights_is_one_clear_message(tmp_path):
    """`ssm2d train --pretrained` offline with an empty Hugging Face cache: one line, no traceback."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (data / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 200, 30)).save(data / split / name / "0.png")
    done = subprocess.run(
        [sys.executable, "-m", "ssm2d", "train", "--model", "deit_tiny_224_ssm2d", "--pretrained", "--dataset",
         "imagefolder", "--data-dir", str(data), "--batch-size", "2", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path / "empty-cache"),
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ssm2d train: error: pretrained: the weights of deit_tiny_224_ssm2d (timm/deit_tiny_patch16_224.fb_in1k) "
        "are not in the local Hugging Face cache"
    ), done.stderr[-3000:]


def test_pretrained_reads_the_local_hub_cache(deit_base, tmp_path):
    """`pretrained=True` offline loads timm's weights from the local Hugging Face cache."""
    _, folder = deit_base
    # A cache laid out as huggingface_hub writes it: refs/main names the snapshot holding the file.
    repo, commit = tmp_path / "cache" / "models--timm--deit_tiny_patch16_224.fb_in1k", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes((folder / "deit_tiny.safetensors").read_bytes())
    probe = (
        "import torch, ssm2d; from safetensors.torch import load_file; "
        "m = ssm2d.create_model('deit_tiny_224_ssm2d', pretrained=True); "
        f"w = load_file({str(folder / 'deit_tiny.safetensors')!r}); "
        "print(torch.equal(m.state_dict()['blocks.3.attn.qkv.weight'], w['blocks.3.attn.qkv.weight']))"
    )
    cached = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=_env(tmp_path / "cache")
    )
    assert cached.returncode == 0 and cached.stdout.strip() == "True", cached.stderr[-3000:]
