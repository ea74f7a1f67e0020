"""`first_order_only`: torch's `once_differentiable` with an error that names the op.

A custom backward written out by hand (the fused and chunked selective scans, the causal
conv1d) computes first derivatives only. Differentiating through it again (double backward,
`torch.autograd.gradgradcheck`, gradient penalties) must fail loudly rather than return wrong
second derivatives; `torch.autograd.function.once_differentiable` does that raising, but its
message names no op and no way out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["first_order_only"]


def first_order_only(op: str) -> Callable:
    """Decorate an `autograd.Function.backward` so that a double backward through it raises.

    The backward runs under `torch.no_grad`; when a graph is being built (create_graph=True),
    its outputs carry a node that raises RuntimeError naming `op` and `fast_path=False` (the
    layers' switch to the `_ref` ops, which are plain autograd and twice differentiable).
    """
    message = (
        f"{op}: double backward is not supported (its backward is written out, first order only); "
        "for higher-order gradients use the reference path, e.g. `layer.fast_path = False`, or the op's `_ref` twin"
    )

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *args: Tensor | None):
            with torch.no_grad():
                outputs = backward(ctx, *args)
            if not torch.is_grad_enabled() or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return outputs
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            # As once_differentiable: aliases of the outputs whose grad_fn raises `message`.
            raising = torch._C._functions.DelayedError(message.encode(), len(outputs))
            return raising(*[None if o is None else o.detach().requires_grad_() for o in outputs])

        return wrapper

    return decorate
