"""ssm2d's model names, registered in timm's registry so that `timm.create_model` builds them."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch.nn as nn
from huggingface_hub.errors import LocalEntryNotFoundError

from ..errors import ConfigError, MissingFileError

__all__ = ["create_model", "list_models", "register_model", "register_variants"]

_NAMES: set[str] = set()
Entrypoint = TypeVar("Entrypoint", bound=Callable[..., nn.Module])


def register_model(fn: Entrypoint) -> Entrypoint:
    """Decorator: register an entrypoint with timm under its function name, and list it as ssm2d's."""
    _NAMES.add(fn.__name__)
    return timm.models.register_model(fn)


def register_variants(create: Callable[..., nn.Module], names: Iterable[str]) -> None:
    """Register one entrypoint per name: `name(pretrained=False, **kwargs)` calls
    `create(name, pretrained, **kwargs)`. The entrypoints belong to `create`'s module."""
    for name in names:
        register_model(_entrypoint(create, name))


def _entrypoint(create: Callable[..., nn.Module], name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = create.__module__
    entrypoint.__doc__ = f"Build {name} (see {create.__module__}); keyword arguments go to the model class."
    return entrypoint


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of ssm2d's registered models matching a shell-style pattern, e.g. "vit_*ssm2d*"."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected a shell-style pattern string, got {pattern!r}")
    return sorted(n for n in _NAMES if fnmatch.fnmatchcase(n, pattern))


def create_model(
    name: str, pretrained: bool = False, pretrained_file: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model: ssm2d's own (see `list_models`) or any other timm name.

    Keyword arguments go to the timm model class (e.g. num_classes, in_chans, img_size,
    drop_path_rate), which raises TypeError on a misspelled one.

    Weights, through timm's loading (its checkpoint filter, head re-initialization for another
    num_classes, stem adaptation for another in_chans):
    - `pretrained_file=PATH`: a .safetensors, or .pth / .bin state dict, of the base timm model
      (for `deit_tiny_224_ssm2d`, timm's `deit_tiny_patch16_224`), given to timm as
      `pretrained_cfg_overlay=dict(file=PATH)`.
    - `pretrained=True`: the published timm weights of the base model where there are some (DeiT),
      from the local Hugging Face cache or the hub.
    The spatial layers of a +2-D SSM model are then inserted at identity: before fine-tuning,
    the model's outputs are those of the base model.

    Raises:
        FileNotFoundError: `pretrained_file` does not exist, or the weights are neither in the
            local cache nor downloadable (offline).
    """
    if name not in _NAMES and not timm.is_model(name):
        close = difflib.get_close_matches(name, sorted(_NAMES), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"name: unknown model {name!r}{hint} (ssm2d.list_models() lists ssm2d's models)")
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise MissingFileError(
                f"pretrained_file: expected a .safetensors, .pth or .bin weights file at {path}, found none"
            )
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": str(path)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except LocalEntryNotFoundError as err:
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
        raise MissingFileError(
            f"pretrained: the weights of {name} ({hub_id}) are not in the local Hugging Face cache and cannot be "
            "downloaded (offline, e.g. HF_HUB_OFFLINE=1); download them once where the hub is reachable, or pass a weights "
            "file with pretrained_file=PATH (--pretrained-file)"
        ) from err
