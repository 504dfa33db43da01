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
    """Float64 (out, lse) from the definition, differentiable (torch autograd), on q's device:
    conftest.ref_attention under the GPU tests' argument names."""
    from conftest import ref_attention
    return ref_attention(q, k, v, mask, bias, scale, groups, causal, l2norm_qk, bias_batch_dim)


def sdpa_same_problem(q, k, v, mask=None, bias=None, scale=8.0, groups=1, causal=False,
                      bias_batch_dim=False):
    """torch SDPA on the problem the kernels solve, in the inputs' dtype: q, k l2-normalised by
    the package, k/v heads repeated for GQA, mask/causal/bias as one additive mask; rows that see
    no key give 0. Differentiable: the baseline the GPU tests' tolerances are set against."""
    import torch.nn.functional as F
    import cupy_cosine_attn as ca
    b, h, i, d = q.shape
    hk, j = k.shape[1], k.shape[2]
    qn, kn = ca.l2norm_tensors(q, k, groups=groups)
    kn = kn.repeat_interleave(h // hk, 1)
    vv = v.repeat_interleave(h // hk, 1)
    vis = torch.ones(b, 1, i, j, dtype=torch.bool, device=q.device)
    if causal:
        vis &= torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)
    if mask is not None:
        vis &= mask[:, None, None, :]
    add = torch.zeros(b, 1, i, j, dtype=q.dtype, device=q.device)
    if bias is not None:
        add = add + (bias if bias.dim() == 4 else bias[:, None] if bias_batch_dim else bias[None])
    add = add.masked_fill(~vis, float("-inf"))
    out = F.scaled_dot_product_attention(qn, kn, vv, attn_mask=add, scale=scale)
    rows = vis.any(-1, keepdim=True).expand(b, h, i, 1)
    return torch.where(rows, out, torch.zeros_like(out))


class ForeignDLPack:
    """An array of some other library: nothing but the DLPack protocol around `a`."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()
