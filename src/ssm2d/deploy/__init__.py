"""From a trained checkpoint to deployment: export (ONNX, torch.export) and prediction on image files."""

from .export import (
    FORMATS,
    ExportResult,
    checkpoint_input_size,
    export_checkpoint,
    export_onnx,
    export_program,
    max_difference,
    onnx_session,
)
from .materialize import (
    EXPORTABLE_LAYERS, ExportError, FixedDepthwiseConv, FixedSequenceConv, check_exportable, materialize_kernels,
)
from .predict import IMAGE_EXTENSIONS, checkpoint_transform, find_images, format_predictions, predict_images

__all__ = [
    "EXPORTABLE_LAYERS",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "FixedDepthwiseConv",
    "FixedSequenceConv",
    "IMAGE_EXTENSIONS",
    "check_exportable",
    "checkpoint_input_size",
    "checkpoint_transform",
    "export_checkpoint",
    "export_onnx",
    "export_program",
    "find_images",
    "format_predictions",
    "materialize_kernels",
    "max_difference",
    "onnx_session",
    "predict_images",
]
