"""The one way an op is registered: a ``torch.library`` custom op, its fake (meta) function and
its autograd formula.

Every op module follows the same template, its functions named after the op::

    def _<op>_impl(x: torch.Tensor, ...) -> torch.Tensor:    # dispatch: Triton or PyTorch path
        return _forward_triton(...) if use_triton(x) else _forward_torch(...)

    def _<op>_fake(x, ...):                                  # shapes and dtypes only
        return x.new_empty(...)

    def _setup_context(ctx, inputs, output): ...             # save only what backward needs
    def _backward(ctx, grad): ...

    _<op>_op = define_op("<op>", _<op>_impl, fake=_<op>_fake, setup_context=_setup_context,
                         backward=_backward)

    def <op>(x, ...):                                        # public: validate, reshape, call _<op>_op
        ...

so ``torch.compile(fullgraph=True)`` keeps the op in the graph and autograd differentiates it.
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "vtok_fast"


def define_op(name: str, impl: Callable, *, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None):
    """Register ``vtok_fast::<name>`` with ``impl`` (fully type-annotated, as ``torch.library``
    requires), its fake function and, when given, its autograd ``backward``/``setup_context``.
    Returns the op; call it like ``impl``."""
    if (backward is None) != (setup_context is None):
        raise ValueError(f"define_op({name!r}): pass backward and setup_context together")
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
