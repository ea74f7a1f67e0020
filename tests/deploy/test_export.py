"""`ssm2d export`: kernels materialized as depthwise convolutions, ONNX checked with onnxruntime,
torch.export programs, and the clear error for layers without an exportable form."""

from __future__ import annotations

import json
import re

import onnx
import pytest
import torch
from deploy_files import trained_checkpoint  # noqa: F401  (a fixture)

import ssm2d
from ssm2d import S4ND, SSM2D
from ssm2d.cli import main
from ssm2d.deploy import (
    ExportError, FixedDepthwiseConv, FixedSequenceConv, check_exportable, export_onnx, export_program,
    materialize_kernels, onnx_session,
)
from ssm2d.layers import MegaEMA
from ssm2d.train import load_trained_model

DIFF = re.compile(r"max \|exported - PyTorch\| on a random batch of (\d+): (\S+) \(tolerance")


@pytest.mark.parametrize(
    "layer",
    [
        lambda: SSM2D(6, state_dim=4, n_ssm=2),
        lambda: SSM2D(6, state_dim=3, directions=2, variant="complex", out_norm=True, kernel_size=(2, 4)),
        lambda: SSM2D(6, state_dim=4, n_ssm=3, c_per_channel=False, skip=False),
        lambda: S4ND(6, state_dim=4),
        lambda: S4ND(6, state_dim=4, channels=2, linear=False, glu=True, kernel_size=3),
        lambda: MegaEMA(6, ndim=3),
        lambda: MegaEMA(6, ndim=2, bidirectional=False),
        lambda: MegaEMA(6, ndim=4, skip=False),
    ],
    ids=["ssm2d", "ssm2d-complex-norm-truncated", "ssm2d-shared-c-no-skip", "s4nd", "s4nd-g2-glu", "ema", "ema-causal",
         "ema-no-skip"],
)  # fmt: skip
def test_materialized_layer_matches_its_eval_forward(layer):
    """The fixed depthwise convolution computes the layer's eval output on the export grid
    (odd, non-square), both in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer()).double().eval()
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    frozen = materialize_kernels(model, x[:1])
    assert isinstance(frozen[0], (FixedDepthwiseConv, FixedSequenceConv))
    assert isinstance(model[0], (SSM2D, S4ND, MegaEMA))  # a copy
    with torch.no_grad():
        expected, got = model(x), frozen(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="materialized for a 5x7 grid, got 7x5"):
        frozen(torch.randn(1, 7, 5, 6, dtype=torch.float64))


def test_export_onnx_then_predict_with_it(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    main(["export", "--checkpoint", str(trained_checkpoint), "--output", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {out} (onnx, input (B, 3x28x28))"
    batch, diff = DIFF.match(lines[1]).groups()
    assert int(batch) == 4 and float(diff) <= 1e-4
    # The file, run here on another batch size, against the checkpoint's model in eval mode.
    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(n.op_type in ("DFT", "STFT") for n in proto.graph.node)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) >= 1 + 4  # patch embedding + one per 2-D SSM layer
    model, _ = load_trained_model(trained_checkpoint)
    session = onnx_session(out)
    for batch in (1, 7):  # any batch size
        x = torch.randn(batch, 3, 28, 28)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)

    folder = trained_checkpoint.parents[1] / "data" / "val"
    main(["predict", "--checkpoint", str(trained_checkpoint), str(folder), "--json", "--topk", "3"])
    eager = json.loads(capsys.readouterr().out)
    main(["predict", "--checkpoint", str(trained_checkpoint), str(folder), "--json", "--topk", "3", "--onnx", str(out)])
    exported = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in exported] == [r["image"] for r in eager] and len(eager) == 6
    for a, b in zip(eager, exported, strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(pa["probability"] - pb["probability"]) < 1e-5


def test_export_torch_program_at_another_size(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    main(["export", "--checkpoint", str(trained_checkpoint), "--output", str(out), "--format", "torch-export",
          "--img-size", "36"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {out} (torch-export, input (B, 3x36x36))" and float(DIFF.match(lines[1])[2]) <= 1e-4
    program = torch.export.load(str(out)).module()
    model, _ = load_trained_model(trained_checkpoint)
    x = torch.randn(3, 3, 36, 36)  # a 9 x 9 patch grid, the kernels materialized for it
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_mini_28_dwconv", "mega_mini_28_ema"])
def test_models_with_a_convolution_or_an_ema_export(name, tmp_path):
    """The depthwise-convolution control and Mega (gated attention, normalized FFN, the EMA as a
    fixed Conv1d) run in onnxruntime and as a torch.export program as in PyTorch, at any batch
    size though exported from an example of batch 1, without FFT operators."""
    torch.manual_seed(0)
    model = ssm2d.create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the small initial weights: outputs of order 1
            p.add_(0.2 * torch.randn_like(p))
    example = torch.randn(1, 1, 28, 28)
    frozen = materialize_kernels(model, example)
    path = export_onnx(frozen, example, tmp_path / "model.onnx")
    assert not any(n.op_type in ("DFT", "STFT") for n in onnx.load(str(path)).graph.node)
    session = onnx_session(path)
    program = torch.export.load(str(export_program(frozen, example, tmp_path / "model.pt2"))).module()
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)
        assert expected.std() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_every_registered_model_exports_unless_it_runs_a_selective_scan():
    """The export list covers every ssm2d layer a registered model uses, but the scans (the
    224-pixel models repeat the layers of the smaller ones and are skipped for time)."""
    scans = {f"ssm2d.layers.{c}" for c in ("vim.VimMixer", "vim.VimMixer2d", "v2m.V2M", "ss2d.SS2D")}
    refused = set()
    for name in (n for n in ssm2d.list_models() if not n.endswith("_224")):
        try:
            check_exportable(ssm2d.create_model(name))
        except ExportError as err:
            layer_class = re.search(r"\((ssm2d\.layers\.[\w.]+)\)", str(err))[1]
            assert layer_class in scans, f"{name}: {err}"
            refused.add(name)
    assert refused >= {"vim_mini_28", "v2m_mini_28", "vmamba_mini_28", "vit_mini_28_vim", "vit_mini_28_v2m",
                       "vit_mini_28_ss2d"}  # fmt: skip
    assert not refused & {"vit_mini_28_dwconv", "mega_mini_28_ema", "mega_mini_28_ssm2d", "mega_mini_28_s4nd"}


@pytest.mark.parametrize(
    "name, path, cls",
    [("vim_mini_28", "layers.0.mixer", "ssm2d.layers.vim.VimMixer"),
     ("vit_mini_28_v2m", "blocks.0.norm1.spatial", "ssm2d.layers.v2m.V2M"),
     ("vmamba_mini_28", "stages.0.blocks.0.mixer", "ssm2d.layers.ss2d.SS2D")],
)  # fmt: skip
def test_selective_scans_are_refused_by_name(name, path, cls):
    model = ssm2d.create_model(name, num_classes=10, in_chans=1)
    with pytest.raises(ExportError, match=rf"layer {re.escape(path)} \({re.escape(cls)}\) cannot be exported"):
        check_exportable(model)
    with pytest.raises(ExportError, match="cannot be exported"):
        materialize_kernels(model, torch.randn(1, 1, 28, 28))


def test_export_errors_are_one_line(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "m.onnx")])
    assert "ssm2d export: error: checkpoint: expected a file written by `ssm2d train`" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(trained_checkpoint), "--output", str(tmp_path / "m.onnx"), "--opset", "13"])
    assert "opset: expected an ONNX opset >= 17, got 13" in str(exit_info.value)
