"""build_model passes img_size to the families built for one input size, and only to them."""

from __future__ import annotations

import pytest
import torch

from ssm2d.errors import ConfigError
from ssm2d.train import build_model


@pytest.mark.parametrize(
    "name, grid",
    [("vit_mini_28_ssm2d", (10, 12)), ("swin_sd_32", None), ("convnext_sd_32_ssm2d", None), ("resnet18", None)],
)
def test_img_size_goes_to_sized_families_only(name, grid):
    model = build_model(name, dict(num_classes=3, in_chans=1, img_size=(40, 48)))
    if grid is not None:
        assert tuple(model.patch_embed.grid_size) == grid, "img_size did not reach the ViT"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 40, 48)).shape == (1, 3)


def test_misspelled_argument_still_raises():
    with pytest.raises(ConfigError, match="model_kwargs: convnext_sd_32_ssm2d: .*num_clases"):
        build_model("convnext_sd_32_ssm2d", dict(num_clases=3, img_size=(32, 32)))
