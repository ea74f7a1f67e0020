"""`ssm2d train --pretrained-file`: a run starts from the base model's weights, with `spatial_lr`
for the new layers, on a small ImageFolder tree written here (no installed data set needed)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ssm2d
from ssm2d.cli import main
from ssm2d.train import load_checkpoint, load_trained_model


@pytest.fixture()
def image_folder(tmp_path):
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog", "owl")):
            for i in range(2):
                colour = (80 * c + 10 * i, 200 - 60 * c, 40 + 20 * i)
                (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (28, 28), colour).save(tmp_path / split / name / f"{i}.png")
    return tmp_path


def test_train_from_a_pretrained_file_with_spatial_lr(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    base = ssm2d.create_model("vit_mini_28")  # the base of vit_mini_28_ssm2d: 1 channel, 10 classes
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, weights)
    out = tmp_path / "run"
    main(["train", "--model", "vit_mini_28_ssm2d", "--dataset", "imagefolder", "--data-dir", str(image_folder),
          "--img-size", "28", "--pretrained-file", str(weights), "--lr", "1e-9", "--min-lr", "0", "--spatial-lr", "1e-3",
          "--epochs", "1", "--batch-size", "3", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0",
          "--auto-augment", "null", "--re-prob", "0", "--repeated-aug", "1", "--workers", "0", "--device", "cpu",
          "--output", str(out)])  # fmt: skip
    capsys.readouterr()
    state = load_checkpoint(out / "last.pt")
    assert "pretrained_file" not in state["model_args"] and state["config"]["pretrained_file"] == str(weights)
    assert sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]}) == [1e-9, 1e-3]
    trained = state["model"]
    # The pretrained blocks moved by at most lr-sized steps; the stem was adapted to 3 channels and
    # the head re-initialized for 3 classes, as timm does.
    for key in ("blocks.2.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "pos_embed"):
        torch.testing.assert_close(trained[key], base.state_dict()[key], rtol=0, atol=1e-6)
    assert trained["patch_embed.proj.weight"].shape[1] == 3 and trained["head.weight"].shape[0] == 3
    # The spatial layers started at C = 0 and learned at spatial_lr.
    assert 0 < trained["blocks.0.norm1.spatial.c_raw"].abs().max() < 0.1
    model, _ = load_trained_model(out / "last.pt")  # rebuilt without the weights file
    assert torch.equal(model.state_dict()["blocks.2.attn.qkv.weight"], trained["blocks.2.attn.qkv.weight"])
