"""torch custom ops: `cupy_cosine_attn::forward` and `cupy_cosine_attn::backward`.

One op pair serves CPU and CUDA tensors (the implementation dispatches on the device), with fake
(meta) implementations so torch.compile traces it without a graph break, and autograd registered
on the forward. Imported only when torch tensors are used.

`attention` is the entry point: eager calls on plain tensors run the same implementation through
an autograd.Function (`_EagerAttention`), which skips the custom-op dispatcher's per-call Python
(host time per call: benchmarks/NOTES.md, v12); while torch.compile traces, and for tensor
subclasses or functorch transforms, the ops run.
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


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",
                      lambda t: False)


def _eager(tensors):
    """True outside torch.compile tracing when every tensor is a plain torch.Tensor (no
    subclass such as tracing's fake tensors, no functorch wrapper): the calls the
    autograd.Function serves."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) is torch.Tensor and not _is_wrapped(t)) for t in tensors)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' forward and backward for eager calls, without the op dispatch. (forward
    takes ctx: the setup_context form binds default arguments through inspect on every call.)

    On the GPU it saves the forward's normalised q and k (and their inverse norms) instead of q
    and k, so the backward does not normalise them again: the same values (the normalisation
    is deterministic), two fewer passes over q and k per training step. The gradients are then
    those of q and k as the forward saw them, whatever happens to q and k afterwards."""

    @staticmethod
    def forward(ctx, problem, args, q, k, v, mask, bias):
        from .api import _run_forward
        out, lse, normalised = _run_forward(problem, keep_normalised=True)
        if normalised is None:
            ctx.save_for_backward(q, k, v, mask, bias, out, lse)
        else:
            qhat, rq, khat, rk = normalised
            ctx.save_for_backward(qhat, khat, v, mask, bias, out, lse, rq, rk)
        ctx.args = args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        # once_differentiable: a second derivative raises (as the custom ops do) instead of
        # silently treating these gradients as constants.
        from .api import _run_backward
        q, k, v, mask, bias, out, lse, *normalised = ctx.saved_tensors
        *problem_args, deterministic = ctx.args
        problem = _problem(q, k, v, mask, bias, *problem_args)
        dq, dk, dv, dbias = _run_backward(problem, dout.contiguous(), out, lse, deterministic,
                                          tuple(normalised) or None)
        return None, None, dq, dk, dv, None, dbias


def attention(problem, q, k, v, mask, bias, bias_batch_dim, deterministic):
    """(out, lse) of the checked `problem` built from these caller tensors, differentiable in q,
    k, v and bias."""
    args = (problem.scale, problem.groups, problem.causal, problem.l2norm_qk, bias_batch_dim,
            deterministic)
    if _eager((q, k, v, mask, bias)):
        return _EagerAttention.apply(problem, args, q, k, v, mask, bias)
    return attn_forward(q, k, v, mask, bias, *args)
