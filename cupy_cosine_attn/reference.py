"""The plain reference: the whole i x j score matrix at once, easy to read, differentiable in torch.

Same definition as every fast path (docs/semantics.md); tests compare against it in float64.
"""
from ._arrays import kind_of
from ._xp import ops_for
from .problem import NORM_EPS, check_scale_groups, make_problem


def grouped_l2norm(x, groups, ops, return_r=False):
    """x * r per group, r = 1/||x_g|| (0 for groups shorter than NORM_EPS), in x's dtype.

    With return_r, also returns r with shape x.shape[:-1] + (groups, 1) for the backward.
    """
    shape = tuple(x.shape)
    d = shape[-1]
    xg = ops.reshape(x, shape[:-1] + (groups, d // groups))
    norm = ops.sqrt(ops.sum(xg * xg, axis=-1, keepdim=True))
    safe = ops.maximum(norm, ops.full((), NORM_EPS, norm.dtype) if ops.name == "torch"
                       else NORM_EPS)
    r = ops.where(norm > NORM_EPS, 1.0 / safe, 0.0 * safe)
    xhat = ops.reshape(xg * r, shape)
    return (xhat, r) if return_r else xhat


def grouped_l2norm_backward(dxhat, xhat, r, groups, ops):
    """Gradient through grouped_l2norm: dx_g = r_g * (dxhat_g - xhat_g * <xhat_g, dxhat_g>)."""
    shape = tuple(xhat.shape)
    split = shape[:-1] + (groups, shape[-1] // groups)
    xg, dg = ops.reshape(xhat, split), ops.reshape(dxhat, split)
    dx = (dg - xg * ops.sum(xg * dg, axis=-1, keepdim=True)) * r
    return ops.reshape(dx, shape)


def l2norm_tensors(*tensors, groups=1):
    """l2-normalise each tensor's last dim in `groups` equal chunks; dtype is kept."""
    if not tensors:
        raise ValueError("l2norm_tensors needs at least one tensor")
    out = []
    for t in tensors:
        kind = kind_of(t, "tensor")
        ops = ops_for(kind)
        _, groups = check_scale_groups(1.0, groups, t.shape[-1])
        dtype_name = str(t.dtype).replace("torch.", "")
        x = ops.cast(t, ops.compute_dtype(dtype_name))
        out.append(ops.cast(grouped_l2norm(x, groups, ops), t.dtype))
    return tuple(out)


def visible_keys(problem, ops):
    """Bool (b, 1, i, j) (or broadcastable) of which keys each query row sees, or None for all."""
    b, h, hk, i, j, d = problem.dims
    vis = None
    if problem.causal:
        rows = ops.reshape(ops.arange(i), (i, 1))
        cols = ops.reshape(ops.arange(j), (1, j))
        vis = cols <= rows + (j - i)
        if ops.name == "torch":
            vis = vis.to(problem.q.device)
    if problem.mask is not None:
        m = ops.reshape(problem.mask, (b, 1, 1, j))
        vis = m if vis is None else (m & vis)
    return vis


def reference_forward(problem):
    """(out, lse) of a canonical `Problem`, in the compute dtype (float32, or float64)."""
    ops = ops_for(problem.kind)
    b, h, hk, i, j, d = problem.dims
    cd = ops.compute_dtype(problem.dtype)
    q, k, v = (ops.cast(t, cd) for t in (problem.q, problem.k, problem.v))
    if problem.l2norm_qk:
        q = grouped_l2norm(q, problem.groups, ops)
        k = grouped_l2norm(k, problem.groups, ops)
    g = h // hk if hk else 1
    if g > 1:  # each k/v head serves g consecutive query heads
        if ops.name == "torch":
            k = k[:, :, None].expand(b, hk, g, j, d).reshape(b, h, j, d)
            v = v[:, :, None].expand(b, hk, g, j, d).reshape(b, h, j, d)
        else:
            import numpy as np
            k = np.broadcast_to(k[:, :, None], (b, hk, g, j, d)).reshape(b, h, j, d)
            v = np.broadcast_to(v[:, :, None], (b, hk, g, j, d)).reshape(b, h, j, d)
    if j == 0:  # no keys: every row sees nothing
        out = q * 0.0
        return out, ops.sum(out, axis=-1) + float("-inf")
    s = (q * problem.scale) @ ops.mT(k)
    if problem.bias is not None:
        s = s + ops.cast(problem.bias, cd)
    vis = visible_keys(problem, ops)
    if vis is not None:
        s = ops.where(vis, s, float("-inf"))
    m = ops.amax(s, axis=-1, keepdim=True)
    m = ops.where(ops.isfinite(m), m, 0.0)
    if ops.name == "torch":
        m = m.detach()  # softmax does not depend on the shift
    e = ops.exp(s - m)
    lsum = ops.sum(e, axis=-1, keepdim=True)
    p = e / ops.where(lsum > 0, lsum, 1.0)
    out = p @ v
    lse = ops.where(lsum > 0, ops.log(ops.where(lsum > 0, lsum, 1.0)) + m, float("-inf"))
    return out, lse[..., 0]


def plain_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1,
                               causal=False, l2norm_qk=True, attn_bias_batch_dim=False):
    """Reference attention over the full score matrix (torch: differentiable; NumPy: arrays)."""
    problem = make_problem(q, k, v, mask, attn_bias, scale, groups, causal, l2norm_qk,
                           attn_bias_batch_dim)
    if problem.kind == "cupy":
        raise TypeError("plain_cosine_sim_attention takes NumPy arrays or torch tensors")
    out, _ = reference_forward(problem)
    ops = ops_for(problem.kind)
    return ops.reshape(ops.to_dtype_name(out, problem.dtype), problem.q_shape)
