"""Mamba initialisation helpers shared by Vim and V2M (docs/math.md §9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm2d.layers.mamba_init import init_dt_proj, s4d_real_a_log


def test_dt_proj_bias_gives_log_uniform_steps():
    proj = nn.Linear(4, 4000)
    init_dt_proj(proj, dt_rank=4, dt_min=1e-3, dt_max=0.1)
    dt = F.softplus(proj.bias.double())
    assert dt.min().item() >= 1e-3 * (1 - 1e-5) and dt.max().item() <= 0.1 * (1 + 1e-5)
    log_dt = dt.log()
    # log-uniform on [log 1e-3, log 0.1]: median at the geometric mean 1e-2, quartiles at 10^-2.5, 10^-1.5
    quartiles = torch.quantile(log_dt, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)) / math.log(10)
    assert quartiles.tolist() == pytest.approx([-2.5, -2.0, -1.5], abs=0.1)
    assert proj.weight.abs().max().item() <= 0.5 and proj.weight.abs().max().item() > 0.45  # U(+-4^-0.5)
    assert proj.bias._optim == {"weight_decay": 0.0}
    assert not hasattr(proj.weight, "_optim")


def test_dt_floor_clamps_small_steps():
    proj = nn.Linear(2, 500)
    init_dt_proj(proj, dt_rank=2, dt_min=1e-6, dt_max=1e-5, dt_init_floor=5e-6)
    dt = F.softplus(proj.bias.double())
    assert dt.min().item() == pytest.approx(5e-6, rel=1e-3)
    assert (dt < 5e-6 * (1 - 1e-3)).sum().item() == 0


def test_init_dt_proj_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dt_proj: expected an nn.Linear with a bias"):
        init_dt_proj(nn.Linear(2, 3, bias=False), 2)
    with pytest.raises(ValueError, match="dt_rank: expected dt_proj.in_features=2, got 3"):
        init_dt_proj(nn.Linear(2, 3), 3)
    with pytest.raises(ValueError, match="dt_min, dt_max"):
        init_dt_proj(nn.Linear(2, 3), 2, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ValueError, match="dt_init_floor"):
        init_dt_proj(nn.Linear(2, 3), 2, dt_init_floor=0.0)


def test_s4d_real_a_log():
    a_log = s4d_real_a_log(3, 5)
    assert a_log.shape == (3, 5) and a_log.dtype == torch.float32
    assert torch.allclose(-torch.exp(a_log), -torch.arange(1.0, 6.0).expand(3, 5))
    with pytest.raises(ValueError, match="d_inner, d_state"):
        s4d_real_a_log(0, 4)
