"""torch custom ops: `cupy_cosine_attn::forward` and `cupy_cosine_attn::backward`.

One op pair serves CPU and CUDA tensors (the implementation dispatches on the device), with fake
(meta) implementations so torch.compile traces it without a graph break, and autograd registered
on the forward. Imported only when torch tensors are used.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .problem import make_problem

_NS = "cupy_cosine_attn"


def _problem(q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim):
    return make_problem(q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim)


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op(f"{_NS}::forward", mutates_args=())
def attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], scale: float, groups: int, causal: bool,
                 l2norm_qk: bool, bias_batch_dim: bool,
                 deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # `deterministic` only travels to the backward (see _setup_context).
    from .api import _run_forward
    return _run_forward(_problem(q, k, v, mask, bias, scale, groups, causal, l2norm_qk,
                                 bias_batch_dim))


@attn_forward.register_fake
def _(q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim, deterministic):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


@torch.library.custom_op(f"{_NS}::backward", mutates_args=())
def attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], scale: float, groups: int, causal: bool,
                  l2norm_qk: bool, bias_batch_dim: bool, deterministic: bool) -> List[torch.Tensor]:
    from .api import _run_backward
    problem = _problem(q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim)
    dq, dk, dv, dbias = _run_backward(problem, dout.contiguous(), out, lse, deterministic)
    if dbias is None:   # ops return tensors only: an empty one stands for "no bias"
        dbias = q.new_empty((0,))
    return [dq, dk, dv, dbias]


@attn_backward.register_fake
def _(dout, q, k, v, out, lse, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim,
      deterministic):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,))
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias]


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, bias, out, lse)
    ctx.args = (scale, groups, causal, l2norm_qk, bias_batch_dim, deterministic)


def _backward(ctx, dout, dlse):
    q, k, v, mask, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = attn_backward(dout, q, k, v, out, lse, mask, bias, *ctx.args)
    return (dq, dk, dv, None, (dbias if bias is not None else None)) + (None,) * 6

torch.library.register_autograd(f"{_NS}::forward", _backward, setup_context=_setup_context)
