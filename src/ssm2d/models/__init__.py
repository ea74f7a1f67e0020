"""timm backbones with spatial layers, and ssm2d's model registry.

Importing this package registers every model with timm, so `timm.create_model(name)` and
`ssm2d.create_model(name)` both build them.
"""

from . import convnext, mega, spvit, swin, v2m, vim, vit, vmamba
from .registry import create_model, list_models, register_model, register_variants
from .retrofit import PLACEMENTS, add_spatial_layers, spatial_layers

__all__ = [
    "PLACEMENTS",
    "add_spatial_layers",
    "convnext",
    "create_model",
    "list_models",
    "mega",
    "register_model",
    "register_variants",
    "spatial_layers",
    "spvit",
    "swin",
    "v2m",
    "vim",
    "vit",
    "vmamba",
]
