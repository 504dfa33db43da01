"""GPU backward kernels: every gradient against float64 autograd of the definition.

fp32 <= 1e-5 relative-norm error; fp16/bf16 no worse than 1.5x PyTorch SDPA's backward error on
the same inputs and dtype (floored); deterministic=True is bitwise reproducible.
"""
import os

import pytest

from gpu_support import lean_hopper_cases, require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import torch  # noqa: E402

import cupy_cosine_attn as ca  # noqa: E402
from helpers import rel_err, sdpa_same_problem, truth  # noqa: E402

DEV = "cuda"
os.environ["CUPY_COSINE_ATTN_POISON"] = "1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOOR = {"float16": 3e-3, "bfloat16": 2e-2}


def sdpa_grads(q, k, v, mask, bias, scale, groups, causal, bbd, dout):
    """Gradients of torch SDPA on the same problem in the same dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    lb = bias.detach().clone().requires_grad_() if bias is not None else None
    out = sdpa_same_problem(*leaves, mask, lb, scale, groups, causal, bbd)
    return torch.autograd.grad(out, leaves + ([lb] if lb is not None else []), dout)


CASES = [
    dict(i=128, j=128),
    dict(i=1, j=77),
    dict(i=77, j=200, causal=True),
    dict(i=200, j=77, causal=True),
    dict(i=150, j=150, causal=True, mask=True),
    dict(i=100, j=150, bias="heads"),
    dict(i=100, j=150, bias="batch", causal=True),
    dict(i=64, j=100, bias="full", mask=True),
    dict(i=90, j=190, hk=1),
    dict(i=90, j=130, hk=2, causal=True, bias="heads"),
    dict(i=130, j=70, groups=2),
    dict(i=130, j=170, l2norm=False),
    dict(i=129, j=129, groups=8, scale=16.0),
    dict(i=300, j=700, causal=True, hk=2),      # many query tiles per key tile, GQA sums
]


def make(dtype_name, d, i, j, causal=False, mask=False, bias=None, hk=4, groups=1, l2norm=True,
         scale=8.0, seed=0):
    dt = DTYPES[dtype_name]
    g = torch.Generator(device=DEV).manual_seed(seed)
    b, h = 2, 4
    q = torch.randn(b, h, i, d, device=DEV, generator=g)
    k = torch.randn(b, hk, j, d, device=DEV, generator=g)
    v = torch.randn(b, hk, j, d, device=DEV, generator=g)
    if not l2norm:
        q, k = ca.l2norm_tensors(q, k, groups=groups)
    q, k, v = (t.to(dt).requires_grad_() for t in (q, k, v))
    m = (torch.rand(b, j, device=DEV, generator=g) > 0.3) if mask else None
    bb = None
    if bias:
        shape = {"heads": (h, i, j), "batch": (b, i, j), "full": (b, h, i, j)}[bias]
        bb = torch.randn(*shape, device=DEV, generator=g).to(dt).requires_grad_()
    kw = dict(mask=m, attn_bias=bb, scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm,
              attn_bias_batch_dim=bias == "batch")
    dout = torch.randn(b, h, i, d, device=DEV, generator=g).to(dt)
    return q, k, v, bb, kw, dout


def run_case(dtype_name, d, deterministic=False, **case):
    q, k, v, bb, kw, dout = make(dtype_name, d, **case)
    leaves = [t for t in (q, k, v, bb) if t is not None]
    out = ca.flash_cosine_sim_attention(q, k, v, **kw, deterministic=deterministic)
    grads = torch.autograd.grad(out, leaves, dout)
    ref, _ = truth(q, k, v, kw["mask"], bb, kw["scale"], kw["groups"], kw["causal"],
                   kw["l2norm_qk"], kw["attn_bias_batch_dim"])
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    base = None
    if dtype_name != "float32":
        try:
            base = sdpa_grads(q, k, v, kw["mask"], bb, kw["scale"], kw["groups"], kw["causal"],
                              kw["attn_bias_batch_dim"], dout)
        except RuntimeError:
            base = None
    for n, (gr, rg) in enumerate(zip(grads, ref_grads)):
        name = "qkvb"[n]
        assert gr.shape == rg.shape and gr.dtype == leaves[n].dtype
        assert torch.isfinite(gr).all(), f"d{name}: NaN/inf (unwritten element?)"
        err = rel_err(gr, rg)
        if dtype_name == "float32":
            assert err <= 1e-5, (name, err)
        else:
            b_err = rel_err(base[n], rg) if base is not None else 0.0
            assert err <= max(1.5 * b_err, FLOOR[dtype_name]), (name, err, b_err)
    return grads


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_backward_features(dtype_name, case):
    run_case(dtype_name, 64, **case)


@lean_hopper_cases
def test_backward_without_mask_or_bias_at_every_hopper_head_dim(dtype_name, d, case):
    run_case(dtype_name, d, **case)


D256_CASES = [dict(i=150, j=150, causal=True, mask=True), dict(i=64, j=100, bias="full", mask=True),
              dict(i=90, j=130, hk=2, causal=True, bias="heads"), dict(i=129, j=129, groups=8, scale=16.0),
              dict(i=300, j=700, causal=True, hk=2)]
D256_LAYOUTS = {"split-roles": {}, "both-compute-sdp": {"CUPY_COSINE_ATTN_SM90_BWD_OVERLAP": "1"},
                "cta-per-half": {"CUPY_COSINE_ATTN_SM90_BWD_WGS": "1"}}


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", D256_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("layout", list(D256_LAYOUTS))
def test_backward_features_at_d256_in_every_column_layout(monkeypatch, dtype_name, case, layout):
    # d = 256 splits the output columns between two warpgroups of one CTA, which split S^T and
    # dP^T between them (default) or both compute both; or between two CTAs of one warpgroup
    for name, value in D256_LAYOUTS[layout].items():
        monkeypatch.setenv(name, value)
    run_case(dtype_name, 256, **case)


# Backward layouts (knob values) at d = 64, two warpgroups and 128-query tiles: each tile's dQ
# issued at the top of the next and added by TMA (default), with cp.async loads, by vector
# reductions; dQ closing its own tile (overlap 1); 64-query tiles; one warpgroup per CTA. At
# d = 128: dK left running into the next tile over three stages (default, overlap 2), overlap 1,
# cp.async loads, vector reductions. The cases walk several query tiles per CTA (both dS^T
# buffers at d = 64), across heads (GQA), from a causal diagonal, with bias and mask.
LAYOUTS = {64: {"deferred-dq": {}, "deferred-dq-cp-async": {"TMA": "0"}, "deferred-dq-vector-red": {"DQ": "4"},
                "overlap-1": {"BWD_OVERLAP": "1"}, "bm64": {"BWD_BM": "64"}, "one-wg": {"BWD_WGS": "1"}},
           128: {"dk-late": {}, "overlap-1": {"BWD_OVERLAP": "1"}, "cp-async": {"TMA": "0"},
                 "dq-vector-red": {"DQ": "4"}}}
LAYOUT_CASES = [dict(i=300, j=700, causal=True, hk=2), dict(i=1000, j=300, hk=2, bias="heads"),
                dict(i=150, j=150, causal=True, mask=True), dict(i=77, j=200, causal=True)]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("d,layout", [(d, name) for d in LAYOUTS for name in LAYOUTS[d]])
def test_backward_features_in_every_layout(monkeypatch, dtype_name, case, d, layout):
    for name, value in LAYOUTS[d][layout].items():
        monkeypatch.setenv(f"CUPY_COSINE_ATTN_SM90_{name}", value)
    run_case(dtype_name, d, **case)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [16, 32, 40, 64, 80, 96, 128, 192, 256])
def test_backward_head_dims(dtype_name, d):
    run_case(dtype_name, d, i=150, j=190, causal=True, mask=True, bias="heads", hk=2)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("d, groups", [(24, 1), (40, 1), (128, 4), (64, 8), (256, 1), (96, 4), (64, 16)])
def test_backward_normalisation_layouts(dtype_name, d, groups):
    """Every layout of the normalisation passes (see test_gpu_forward.GROUP_LAYOUTS)."""
    run_case(dtype_name, d, i=70, j=90, causal=True, groups=groups, scale=4.0)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", [dict(i=130, j=170, causal=True, bias="heads", hk=2),
                                  dict(i=64, j=100, bias="full", mask=True),
                                  dict(i=100, j=150, bias="batch")])
def test_deterministic_matches_reference_and_is_bitwise_stable(dtype_name, case):
    g1 = run_case(dtype_name, 64, deterministic=True, **case)
    g2 = run_case(dtype_name, 64, deterministic=True, **case)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_merged_layout_and_single_head_kv_gradients():
    g = torch.Generator(device=DEV).manual_seed(5)
    q = torch.randn(6, 90, 64, device=DEV, generator=g, dtype=torch.float16, requires_grad=True)
    k = torch.randn(6, 110, 64, device=DEV, generator=g, dtype=torch.float16, requires_grad=True)
    v = torch.randn(6, 110, 64, device=DEV, generator=g, dtype=torch.float16, requires_grad=True)
    bias = torch.randn(6, 90, 110, device=DEV, generator=g, dtype=torch.float16, requires_grad=True)
    out = ca.flash_cosine_sim_attention(q, k, v, attn_bias=bias, causal=True)
    ref, _ = truth(q, k, v, bias=bias, causal=True)
    for a, r in zip(torch.autograd.grad(out.sum(), (q, k, v, bias)),
                    torch.autograd.grad(ref.sum(), (q, k, v, bias))):
        assert rel_err(a, r) < 5e-3


def test_large_offsets_backward():
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory")
    n, d = 2**25 + 64, 64                     # q, dq, dout: 2^31 + 4096 elements each
    q = torch.randn(1, 1, n, d, device=DEV, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 1, 256, d, device=DEV, dtype=torch.float16, requires_grad=True)
    v = torch.randn(1, 1, 256, d, device=DEV, dtype=torch.float16, requires_grad=True)
    out = ca.flash_cosine_sim_attention(q, k, v)
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    tail = slice(n - 64, n)
    qt = q.detach()[:, :, tail].requires_grad_()
    ref, _ = truth(qt, k.detach(), v.detach())
    rq, = torch.autograd.grad(ref.sum(), (qt,))
    assert rel_err(dq[:, :, tail], rq) < 5e-3



def test_row_statistics_are_packed_per_query_tile():
    """The Hopper backward's row statistics (prep.cu's pack_row_stats): per (head, tile of bm
    query rows) lse·log2(e), then delta; a row that saw no key (lse = -inf) gets +inf, the rows
    past i +inf and 0 (probability 0, no gradient)."""
    import cupy as cp
    import numpy as np
    from cupy_cosine_attn import hopper_launch
    heads, i = 3, 150
    for bm in (64, 128):
        rng = np.random.default_rng(bm)
        lse = rng.standard_normal((heads, i)).astype(np.float32)
        lse[1, 7] = -np.inf
        delta = rng.standard_normal((heads, i)).astype(np.float32)
        stats = hopper_launch.pack_row_stats(cp.asarray(lse), cp.asarray(delta), heads, i, bm).get()
        tiles = -(-i // bm)
        assert stats.shape == (heads, tiles, 2, bm)
        want_lse = np.full((heads, tiles * bm), np.inf, np.float32)
        want_lse[:, :i] = lse * np.float32(np.log2(np.e))
        want_lse[1, 7] = np.inf
        want_delta = np.zeros((heads, tiles * bm), np.float32)
        want_delta[:, :i] = delta
        np.testing.assert_allclose(stats[:, :, 0].reshape(heads, -1), want_lse, rtol=1e-6)
        np.testing.assert_array_equal(stats[:, :, 1].reshape(heads, -1), want_delta)
