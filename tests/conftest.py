"""Shared test set-up: the float64 ground truth (written from docs/semantics.md, independent of the
package's own reference), seeded input factories and the hypothesis profiles.

Test modules import the helpers with `from conftest import ...`; this directory is put on
sys.path so that works under any pytest import mode.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypothesis import settings  # noqa: E402

# Seeded and reproducible: the same examples on every run, no per-example deadline (first calls
# pay for lazy imports), few enough examples for the whole CPU suite to stay within minutes.
settings.register_profile("cpu", derandomize=True, deadline=None, max_examples=100,
                          print_blob=True)
# HYPOTHESIS_PROFILE=thorough: more examples, for a longer search after changes.
settings.register_profile("thorough", derandomize=True, deadline=None, max_examples=1000,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cpu"))

NORM_EPS = 1e-12     # docs/semantics.md: chunks with norm <= 1e-12 normalise to zero


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------

def grouped_l2norm_ref(x, groups):
    d = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], groups, d // groups)
    n = torch.linalg.vector_norm(xg, dim=-1, keepdim=True)
    # The untaken branch is finite too (clamp), so no NaN leaks into the gradient.
    r = torch.where(n > NORM_EPS, 1.0 / n.clamp_min(NORM_EPS), torch.zeros_like(n))
    return (xg * r).reshape(x.shape)


def ref_attention(q, k, v, mask=None, attn_bias=None, scale=8.0, groups=1, causal=False,
                  l2norm_qk=True, attn_bias_batch_dim=False, _parts=None):
    """(out, lse) in float64 straight from the definition; differentiable through torch autograd.

    Takes torch tensors or NumPy arrays in any caller layout: q (b, h, i, d) with k, v
    (b, hk, j, d) or (b, j, d); or merged q, k, v (B, n, d). Rows with no visible key give
    out = 0 and lse = -inf, and pass no gradient.
    """
    q, k, v = (to_f64(t) for t in (q, k, v))
    merged = q.dim() == 3
    if merged:
        q, k, v = q[:, None], k[:, None], v[:, None]
    elif k.dim() == 3:
        k, v = k[:, None], v[:, None]
    b, h, i, d = q.shape
    hk, j = k.shape[1], k.shape[2]
    if l2norm_qk:
        q, k = grouped_l2norm_ref(q, groups), grouped_l2norm_ref(k, groups)
    if hk and h:
        k = k.repeat_interleave(h // hk, dim=1)      # query head hq reads k/v head hq // (h/hk)
        v = v.repeat_interleave(h // hk, dim=1)
    if j == 0 or h == 0:
        out = q * 0.0
        return _unmerge(out, torch.full(out.shape[:-1], -math.inf, dtype=torch.float64), merged)
    s = scale * (q @ k.transpose(-1, -2))
    if attn_bias is not None:
        bias = to_f64(attn_bias)
        if bias.dim() == 4:
            s = s + bias
        elif merged or attn_bias_batch_dim:
            s = s + bias[:, None]
        else:
            s = s + bias[None]
    dev = q.device                 # CPU here; the GPU tests pass CUDA tensors
    visible = torch.ones(b, 1, i, j, dtype=torch.bool, device=dev)
    if causal:
        rows = torch.arange(i, device=dev)[:, None]
        cols = torch.arange(j, device=dev)[None, :]
        visible = visible & (cols <= rows + (j - i))
    if mask is not None:
        visible = visible & torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray)
                                            else mask).to(dev)[:, None, None, :]
    if _parts is not None:     # for ref_grads' cancellation floor: logits before masking
        _parts.update(s=s, v=v, merged=merged)
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    seen = den > 0
    p = e / torch.where(seen, den, torch.ones_like(den))
    out = p @ v
    if _parts is not None:
        _parts.update(p=p.detach())
    lse = torch.where(seen, torch.log(torch.where(seen, den, torch.ones_like(den))) + m,
                      torch.full_like(den, -math.inf))[..., 0]
    return _unmerge(out, lse, merged)


def _unmerge(out, lse, merged):
    return (out[:, 0], lse[:, 0]) if merged else (out, lse)


def to_f64(x):
    """float64 torch view of x keeping autograd history (NumPy arrays are converted)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.astype(np.float64))
    return x.to(torch.float64)


def ref_grads(q, k, v, dout, mask=None, attn_bias=None, out=None, with_floor=False, **kw):
    """(dq, dk, dv, dbias) of the ground truth for upstream gradient dout, all float64 torch.

    `out`, when given, is the output the implementation stored (rounded to the input dtype).
    docs/semantics.md defines the backward with D_r = <dout_r, out_r> of that stored output, so
    the truth takes D from it too: dS = P (dP - D) gains P * delta_r, with
    delta_r = <dout_r, out_exact_r - out_r>, which is the gradient of sum_r delta_r * lse_r.
    Without this, rounding `out` to float16 alone moves dq by up to ~2% when the softmax is
    nearly one-hot (dP - D cancels), whatever the implementation does.

    with_floor=True also returns the same gradients computed from A = P (|dP| + |D|) in place of
    dS: the size of the terms that dS = P (dP - D) cancels. A float32 implementation of that
    formula is accurate relative to these magnitudes, not to a gradient that cancels to ~0.
    """
    leaves = [to_f64(t).detach().requires_grad_() for t in (q, k, v)]
    bias = None if attn_bias is None else to_f64(attn_bias).detach().requires_grad_()
    parts = {}
    ref_out, ref_lse = ref_attention(*leaves, mask=mask, attn_bias=bias, _parts=parts, **kw)
    inputs = leaves + ([bias] if bias is not None else [])
    dout64 = to_f64(dout).detach()
    zeros = [torch.zeros_like(t) for t in inputs]
    grads, floors = list(zeros), list(zeros)
    if ref_out.numel() and ref_out.requires_grad:
        grads = list(torch.autograd.grad(ref_out, inputs, dout64, allow_unused=True,
                                         retain_graph=True))
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        stored = ref_out.detach() if out is None else to_f64(out).detach()
        if out is not None and ref_lse.requires_grad:
            delta = (dout64 * (ref_out.detach() - stored)).sum(-1)
            finite = torch.isfinite(ref_lse)
            lse = torch.where(finite, ref_lse, torch.zeros_like(ref_lse))
            corr = torch.autograd.grad((torch.where(finite, delta, 0.0) * lse).sum(), inputs,
                                       allow_unused=True, retain_graph=True)
            grads = [g if c is None else g + c for g, c in zip(grads, corr)]
        if with_floor and "s" in parts:
            do4, o4 = dout64, stored
            if parts["merged"]:
                do4, o4 = do4[:, None], o4[:, None]
            dp = do4 @ parts["v"].detach().transpose(-1, -2)
            big_d = (do4 * o4).sum(-1, keepdim=True)
            a = parts["p"] * (dp.abs() + big_d.abs())
            fl = torch.autograd.grad((a * parts["s"]).sum(), inputs, allow_unused=True)
            floors = [torch.zeros_like(t) if f is None else f for f, t in zip(fl, inputs)]
    if bias is None:
        grads.append(None)
        floors.append(None)
    return (tuple(grads), tuple(floors)) if with_floor else tuple(grads)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}


def randn(shape, seed, dtype="float32", framework="torch"):
    """Seeded standard normal of a dtype name, as a torch tensor or (framework='numpy') array."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)),
                    dtype=torch.float64)
    x = x.to(TORCH_DTYPES[dtype])
    return x.to(torch.float64).numpy().astype(dtype) if framework == "numpy" else x


def rand_mask(shape, seed, p_keep=0.7, framework="torch"):
    g = torch.Generator().manual_seed(int(seed))
    m = torch.rand(*shape, generator=g) < p_keep
    return m.numpy() if framework == "numpy" else m


LAYOUTS = ("bhnd", "merged", "single_kv", "gqa")


def shapes_for(layout, b, h, i, j, d, hk=None):
    """(q shape, k/v shape) for a caller layout. gqa uses hk (default h // 2, at least 1)."""
    if layout == "bhnd":
        return (b, h, i, d), (b, h, j, d)
    if layout == "merged":
        return (b * h, i, d), (b * h, j, d)
    if layout == "single_kv":
        return (b, h, i, d), (b, j, d)
    if layout == "gqa":
        hk = max(1, h // 2) if hk is None else hk
        return (b, h, i, d), (b, hk, j, d)
    raise ValueError(layout)


def bias_shape_for(layout, form, b, h, i, j):
    """(shape, attn_bias_batch_dim) of a bias form: 'heads' (h,i,j), 'batch' (b,i,j),
    'full' (b,h,i,j); merged layouts take (B, i, j) whatever the form."""
    if layout == "merged":
        return (b * h, i, j), False
    return {"heads": ((h, i, j), False), "batch": ((b, i, j), True),
            "full": ((b, h, i, j), False)}[form]


def make_case(seed, layout="bhnd", b=2, h=2, i=9, j=11, d=16, hk=None, dtype="float32",
              framework="torch", mask=False, bias=None, bias_scale=1.0):
    """Dict with q, k, v, mask, attn_bias, attn_bias_batch_dim (fresh, seeded)."""
    qs, ks = shapes_for(layout, b, h, i, j, d, hk)
    case = dict(q=randn(qs, seed, dtype, framework), k=randn(ks, seed + 1, dtype, framework),
                v=randn(ks, seed + 2, dtype, framework), mask=None, attn_bias=None,
                attn_bias_batch_dim=False)
    if mask:
        case["mask"] = rand_mask((qs[0], j), seed + 3, framework=framework)
    if bias is not None:
        shape, bbd = bias_shape_for(layout, bias, b, h, i, j)
        bias_t = randn(shape, seed + 4, "float64") * bias_scale
        bias_t = bias_t.to(TORCH_DTYPES[dtype])
        case["attn_bias"] = (bias_t.to(torch.float64).numpy().astype(dtype)
                             if framework == "numpy" else bias_t)
        case["attn_bias_batch_dim"] = bbd
    return case


def assert_lse_close(lse, ref_lse, dtype):
    """lse: -inf exactly where the reference is -inf, and close elsewhere."""
    from tolerances import assert_close
    lse64 = to_f64(torch.as_tensor(lse) if isinstance(lse, np.ndarray) else lse).detach()
    ref64 = ref_lse.detach()
    assert tuple(lse64.shape) == tuple(ref64.shape), (tuple(lse64.shape), tuple(ref64.shape))
    assert not torch.isnan(lse64).any(), "lse has NaN"
    dead = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(lse64), dead), "lse is -inf on other rows than the reference"
    assert_close(lse64[~dead], ref64[~dead], dtype, "lse")


# (name, make_case kwargs, call kwargs): the feature grid shared by the forward and backward tests
FEATURES = [
    ("plain", {}, {}),
    ("mask", dict(mask=True), {}),
    ("causal_i_lt_j", dict(i=9, j=21), dict(causal=True)),
    ("causal_i_gt_j", dict(i=21, j=6), dict(causal=True)),       # rows 0..14 see no key
    ("causal_i_eq_1", dict(i=1, j=33), dict(causal=True)),
    ("causal_square", dict(i=17, j=17), dict(causal=True)),
    ("mask_causal", dict(i=12, j=15, mask=True), dict(causal=True)),
    ("bias_heads", dict(bias="heads"), {}),
    ("bias_batch", dict(bias="batch"), {}),
    ("bias_full", dict(bias="full"), {}),
    ("bias_full_mask_causal", dict(bias="full", mask=True, i=10, j=14), dict(causal=True)),
    ("bias_heads_mask_causal", dict(bias="heads", mask=True, i=10, j=14), dict(causal=True)),
    ("groups4", {}, dict(groups=4)),
    ("no_l2norm", {}, dict(l2norm_qk=False)),
    ("scale_3_5", {}, dict(scale=3.5)),
    ("wide_bias_heads", dict(bias="heads", bias_scale=40.0), {}),   # beyond any fixed shift
    ("wide_bias_batch", dict(bias="batch", bias_scale=40.0), {}),
    ("groups8_scale16", dict(d=32), dict(groups=8, scale=16)),
]
FEATURE_IDS = [f[0] for f in FEATURES]


# ----------------------------------------------------------------------------------------------
# Property tests: one random problem (shape, features, dtype, framework) for forward and backward
# ----------------------------------------------------------------------------------------------

def draw_problem(draw, long_max):
    """(case_kw for make_case, call options, prenorm) drawn for a hypothesis property test;
    lengths are short (1..40) or long (200..long_max). prenorm: without l2norm_qk the caller
    usually passes normalised q, k; sometimes raw ones (logits of +-70: a near one-hot softmax)."""
    from hypothesis import strategies as st
    layout = draw(st.sampled_from(LAYOUTS))
    framework = draw(st.sampled_from(["torch", "numpy"]))
    dtypes = ["float16", "float32", "float64"] + (["bfloat16"] if framework == "torch" else [])
    dtype = draw(st.sampled_from(dtypes))
    b = draw(st.integers(1, 2))
    h = draw(st.sampled_from([1, 2, 4]))
    hk = draw(st.sampled_from([x for x in (1, 2, 4) if h % x == 0]))
    length = st.one_of(st.integers(1, 40), st.integers(200, long_max))
    i, j = draw(length), draw(length)
    d = draw(st.sampled_from([8, 16, 24, 64]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if d % g == 0]))
    bias = draw(st.sampled_from([None, "heads", "batch", "full"]))
    case_kw = dict(layout=layout, b=b, h=h, hk=hk, i=i, j=j, d=d, dtype=dtype,
                   framework=framework, mask=draw(st.booleans()), bias=bias)
    kw = dict(causal=draw(st.booleans()), groups=groups,
              l2norm_qk=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 8, 16.0])))
    prenorm = not kw["l2norm_qk"] and draw(st.booleans())
    return case_kw, kw, prenorm


def prenormalise(case, groups):
    """q, k normalised by the test's own float64 code, then rounded back to their dtype."""
    for name in ("q", "k"):
        x = case[name]
        y = grouped_l2norm_ref(to_f64(x), groups)
        case[name] = (y.numpy().astype(x.dtype) if isinstance(x, np.ndarray)
                      else y.to(x.dtype))
