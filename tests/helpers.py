"""Shared test helpers: a float64 ground truth written from docs/semantics.md, and error norms."""
import math

import numpy as np
import torch

# Relative-norm error allowed per dtype of the inputs (outputs and gradients), written once.
TOLERANCE = {
    "float64": 1e-10,
    "float32": 2e-5,
    "float16": 5e-3,
    "bfloat16": 3e-2,
}


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (never passes)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) else x)
    x = x.detach().to(torch.float64)
    ref = torch.as_tensor(ref).detach().to(torch.float64)
    assert tuple(x.shape) == tuple(ref.shape), (tuple(x.shape), tuple(ref.shape))
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close(x, ref, dtype_name, what="output"):
    err = rel_err(x, ref)
    assert err <= TOLERANCE[dtype_name], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype_name]}"


def truth(q, k, v, mask=None, bias=None, scale=8.0, groups=1, causal=False, l2norm_qk=True,
          bias_batch_dim=False):
    """Float64 attention straight from the definition, differentiable (torch autograd).

    q (b, h, i, d) or (B, i, d); k, v (b, hk, j, d), (b, j, d) or (B, j, d); any float dtype.
    """
    merged = q.dim() == 3
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if merged:
        q, k, v = q[:, None], k[:, None], v[:, None]
    elif k.dim() == 3:
        k, v = k[:, None], v[:, None]
    b, h, i, d = q.shape
    hk, j = k.shape[1], k.shape[2]

    def norm(x):
        xg = x.reshape(*x.shape[:-1], groups, d // groups)
        n = xg.norm(dim=-1, keepdim=True)
        r = torch.where(n > 1e-12, 1.0 / n.clamp_min(1e-12), torch.zeros_like(n))
        return (xg * r).reshape(x.shape)

    if l2norm_qk:
        q, k = norm(q), norm(k)
    rep = h // hk
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        bias = bias.to(torch.float64)
        if bias.dim() == 4:
            s = s + bias
        elif merged or bias_batch_dim:
            s = s + bias[:, None]
        else:
            s = s + bias[None]
    visible = torch.ones(b, 1, i, j, dtype=torch.bool, device=q.device)
    if causal:
        r = torch.arange(i, device=q.device)[:, None]
        c = torch.arange(j, device=q.device)[None, :]
        visible = visible & (c <= r + (j - i))
    if mask is not None:
        visible = visible & mask.to(q.device)[:, None, None, :]
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    out = (e / torch.where(den > 0, den, torch.ones_like(den))) @ v
    lse = torch.where(den > 0, den.log() + m, torch.full_like(den, -math.inf))[..., 0]
    if merged:
        out, lse = out[:, 0], lse[:, 0]
    return out, lse
