"""Public API and the one dispatch point between the CPU tiled path and the GPU kernels.

    NumPy array        -> tiled NumPy path
    torch CPU tensor   -> tiled torch path (autograd through the custom ops in torch_ops)
    torch CUDA tensor  -> GPU kernels, zero-copy through DLPack
    CuPy array         -> GPU kernels
    other DLPack array -> taken in zero-copy as NumPy (CPU) or CuPy (CUDA); results come back as
                          those arrays
"""
from __future__ import annotations


from . import cpu_tiled
from ._arrays import adopt_dlpack
from ._xp import ops_for
from .problem import Problem, make_problem


def lse_dtype(problem: Problem) -> str:
    """float32, or float64 for float64 inputs (so float64 gradients keep float64 accuracy)."""
    return "float64" if problem.dtype == "float64" else "float32"


def _backend(problem: Problem) -> str:
    return "cpu" if problem.device == "cpu" else "gpu"


def _run_forward(problem: Problem, keep_normalised=False):
    """(out, lse) in the caller's layout: out in the input dtype, lse float32 q.shape[:-1].
    keep_normalised: (out, lse, normalised), normalised as gpu_bridge.forward returns it on the
    GPU (the normalised q, k and inverse norms for _run_backward), None on the CPU."""
    if _backend(problem) == "gpu":
        from . import gpu_bridge
        return gpu_bridge.forward(problem, keep_normalised)
    ops = ops_for(problem.kind)
    out, lse = cpu_tiled.tiled_forward(problem)
    out = ops.reshape(ops.to_dtype_name(out, problem.dtype), problem.q_shape)
    lse = ops.reshape(ops.to_dtype_name(lse, lse_dtype(problem)), problem.lse_shape)
    return (out, lse, None) if keep_normalised else (out, lse)


def _run_backward(problem: Problem, dout, out, lse, deterministic=False, normalised=None):
    """(dq, dk, dv, dbias) in the caller's shapes and dtype; dbias None without a bias.
    normalised: (rq, rk) from _run_forward(keep_normalised=True) on the GPU, when problem's q
    and k are the normalised ones it returned."""
    if _backend(problem) == "gpu":
        from . import gpu_bridge
        return gpu_bridge.backward(problem, dout, out, lse, deterministic, normalised)
    if normalised is not None:
        raise ValueError("normalised: only for GPU calls")
    ops = ops_for(problem.kind)
    b, h, hk, i, j, d = problem.dims
    dq, dk, dv, dbias = cpu_tiled.tiled_backward(
        problem, ops.reshape(dout, (b, h, i, d)), ops.reshape(out, (b, h, i, d)),
        ops.reshape(lse, (b, h, i)))
    cast = lambda x, shape: ops.reshape(ops.to_dtype_name(x, problem.dtype), shape)
    dq = cast(dq, problem.q_shape)
    dk = cast(dk, problem.k_shape)
    dv = cast(dv, problem.k_shape)
    if dbias is not None:
        dbias = cast(dbias, problem.bias_shape)
    return dq, dk, dv, dbias


def _adopt(**arrays):
    """Arguments from other DLPack libraries as NumPy/CuPy arrays, in the order given."""
    return tuple(adopt_dlpack(x, name) for name, x in arrays.items())


def _check_like(name, x, shape, problem, dtype=None):
    from . import _arrays
    if _arrays.kind_of(x, name) != problem.kind:
        raise TypeError(f"{name} must be a {problem.kind} array like q")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    want = dtype or problem.dtype
    if _arrays.dtype_name(x) != want:
        raise TypeError(f"{name} must have dtype {want}, got {_arrays.dtype_name(x)}")
    if _arrays.device_of(x) != problem.device:
        raise ValueError(f"{name} is on {_arrays.device_of(x)} but q is on {problem.device}")


def forward(q, k, v, mask=None, attn_bias=None, scale=8, groups=1, causal=False,
            l2norm_qk=True, attn_bias_batch_dim=False):
    """Functional forward: returns (out, lse); lse is float32 (float64 for float64 inputs),
    shape q.shape[:-1]."""
    q, k, v, mask, attn_bias = _adopt(q=q, k=k, v=v, mask=mask, attn_bias=attn_bias)
    problem = make_problem(q, k, v, mask, attn_bias, scale, groups, causal, l2norm_qk,
                           attn_bias_batch_dim)
    return _run_forward(problem)


def backward(dout, q, k, v, out, lse, mask=None, attn_bias=None, scale=8, groups=1,
             causal=False, l2norm_qk=True, attn_bias_batch_dim=False, deterministic=False):
    """Functional backward: returns (dq, dk, dv, dbias); dbias is None without attn_bias."""
    dout, q, k, v, out, lse, mask, attn_bias = _adopt(
        dout=dout, q=q, k=k, v=v, out=out, lse=lse, mask=mask, attn_bias=attn_bias)
    problem = make_problem(q, k, v, mask, attn_bias, scale, groups, causal, l2norm_qk,
                           attn_bias_batch_dim)
    _check_like("dout", dout, problem.q_shape, problem)
    _check_like("out", out, problem.q_shape, problem)
    _check_like("lse", lse, problem.lse_shape, problem, dtype=lse_dtype(problem))
    return _run_backward(problem, dout, out, lse, deterministic)


def flash_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1,
                               causal=False, l2norm_qk=True, attn_bias_batch_dim=False,
                               *, deterministic=False):
    """Cosine-similarity attention; drop-in for the original package's function of this name.

    torch tensors (CPU or CUDA) get gradients for q, k, v and attn_bias through autograd, via the
    custom ops in torch_ops (so torch.compile and CUDA graphs see one opaque op; eager calls take
    a leaner path to the same implementation).
    NumPy and CuPy arrays return the output array. `deterministic=True` makes GPU gradients
    bitwise reproducible.
    """
    q, k, v, mask, attn_bias = _adopt(q=q, k=k, v=v, mask=mask, attn_bias=attn_bias)
    problem = make_problem(q, k, v, mask, attn_bias, scale, groups, causal, l2norm_qk,
                           attn_bias_batch_dim)
    if problem.kind != "torch":
        return _run_forward(problem)[0]
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    from .torch_ops import attention
    return attention(problem, q, k, v, mask, attn_bias, attn_bias_batch_dim, deterministic)[0]
