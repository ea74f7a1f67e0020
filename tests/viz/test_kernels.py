"""Kernel heat maps and the `ssm2d kernels` command."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from ssm2d import SSM2D
from ssm2d.cli import main
from ssm2d.ops import fold_directions
from ssm2d.viz import layer_kernel_panels, save_kernel_heatmaps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_panels_are_receptive_fields():
    """Each direction's origin sits in the corner opposite its name; folded = centered, flipped."""
    layer = SSM2D(4, state_dim=3).double()
    grid = (5, 7)
    kernels = layer.kernels(grid)
    panels = layer_kernel_panels(layer, grid)
    assert list(panels) == ["from top-left", "from bottom-right", "from top-right", "from bottom-left", "folded"]
    origins = {
        "from top-left": (-1, -1),
        "from bottom-right": (0, 0),
        "from top-right": (-1, 0),
        "from bottom-left": (0, -1),
    }
    for r, (name, (i, j)) in enumerate(origins.items()):
        assert panels[name].shape == (4, *grid)
        assert_close(panels[name][:, i, j], kernels[r, :, 0, 0].float(), torch.float32, f"{name} origin")
    assert_close(panels["folded"], fold_directions(kernels).flip(-2, -1).float(), torch.float32, "folded")


def test_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "sub" / "kernels.png"
    main(["kernels", "--init", "--dim", "4", "--state-dim", "2", "--grid", "5", "7", "--channels", "3",
          "--output", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in capsys.readouterr().out


def test_cli_requires_a_source(tmp_path):
    with pytest.raises(SystemExit):
        main(["kernels", "--output", str(tmp_path / "k.png")])


@pytest.mark.parametrize(
    "kernels, pattern",
    [
        ({}, r"kernels: expected at least one"),
        ({"k": torch.zeros(3, 3)}, r"kernels\['k'\]: expected shape \(C, h, w\)"),
    ],
    ids=["empty", "2-D"],
)
def test_heatmap_errors(tmp_path, kernels, pattern):
    with pytest.raises(ValueError, match=pattern):
        save_kernel_heatmaps(kernels, tmp_path / "k.png")
