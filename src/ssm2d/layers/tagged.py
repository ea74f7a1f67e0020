"""Modules whose parameters carry their own optimizer settings (`ssm2d.param_groups` reads them)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["NO_WEIGHT_DECAY", "TaggedModule"]

NO_WEIGHT_DECAY = {"weight_decay": 0.0}


class TaggedModule(nn.Module):
    """An nn.Module that sets `_optim` tags on some of its parameters in `_tag_parameters`.

    `copy.deepcopy` and unpickling build new Parameters without their attributes, so the tags
    are set again whenever the module's state is restored.
    """

    def _tag_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say which parameters it tags")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._tag_parameters()
