"""Pictures of what the spatial layers learn."""

from .kernels import layer_kernel_panels, model_kernel_panels, save_kernel_heatmaps

__all__ = ["layer_kernel_panels", "model_kernel_panels", "save_kernel_heatmaps"]
