"""CPU forward (torch tiled path, NumPy functional layer, plain reference) against the float64
definition in conftest.ref_attention: every layout, feature, dtype, awkward length and edge case."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import cupy_cosine_attn as ca
from conftest import (FEATURE_IDS, FEATURES, LAYOUTS, assert_lse_close, draw_problem,
                      grouped_l2norm_ref, make_case, prenormalise, rand_mask, randn, ref_attention,
                      to_f64)
from tolerances import assert_close

KW = ("mask", "attn_bias", "attn_bias_batch_dim")
_SUBSET = [f for f in FEATURES if f[0] in ("plain", "mask", "causal_i_gt_j", "mask_causal",
                                            "bias_full", "groups4", "no_l2norm")]



def call_kwargs(case, extra):
    kw = {k: case[k] for k in KW}
    kw.update(extra)
    return kw


def check_forward(case, extra, dtype, framework="torch", fn=None):
    """Runs one forward entry point, compares out (and lse when it returns one) with the truth."""
    fn = fn or ca.flash_cosine_sim_attention
    kw = call_kwargs(case, extra)
    res = fn(case["q"], case["k"], case["v"], **kw)
    ref_out, ref_lse = ref_attention(case["q"], case["k"], case["v"], **kw)
    out, lse = res if isinstance(res, tuple) else (res, None)
    want_type = torch.Tensor if framework == "torch" else np.ndarray
    assert isinstance(out, want_type), type(out)
    assert tuple(out.shape) == tuple(case["q"].shape)
    assert out.dtype == case["q"].dtype, (out.dtype, case["q"].dtype)
    assert_close(out, ref_out, dtype, "out")
    if lse is not None:
        assert isinstance(lse, want_type)
        lse_dtype = "float64" if dtype == "float64" else "float32"
        got = str(lse.dtype).replace("torch.", "")
        assert got == lse_dtype, f"lse dtype {got}, want {lse_dtype}"
        assert tuple(lse.shape) == tuple(case["q"].shape[:-1])
        assert_lse_close(lse, ref_lse, dtype)
    return out, lse


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,case_kw,kw", FEATURES, ids=FEATURE_IDS)
def test_torch_layouts_and_features(layout, name, case_kw, kw):
    case_kw = dict(dict(h=4), **case_kw)
    for dtype in ("float64", "float32"):
        case = make_case(11, layout, dtype=dtype, **case_kw)
        check_forward(case, kw, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,case_kw,kw", FEATURES, ids=FEATURE_IDS)
def test_numpy_functional_forward(layout, name, case_kw, kw):
    case_kw = dict(dict(h=4), **case_kw)
    for dtype in ("float64", "float32"):
        case = make_case(12, layout, dtype=dtype, framework="numpy", **case_kw)
        check_forward(case, kw, dtype, "numpy", ca.forward)
        check_forward(case, kw, dtype, "numpy", ca.flash_cosine_sim_attention)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,case_kw,kw", FEATURES, ids=FEATURE_IDS)
def test_plain_reference_matches_definition(layout, name, case_kw, kw):
    case_kw = dict(dict(h=4), **case_kw)
    check_forward(make_case(13, layout, dtype="float64", **case_kw), kw, "float64",
                  fn=ca.plain_cosine_sim_attention)
    check_forward(make_case(13, layout, dtype="float32", framework="numpy", **case_kw), kw,
                  "float32", "numpy", ca.plain_cosine_sim_attention)


def test_torch_functional_forward_returns_lse():
    case = make_case(14, "gqa", h=4, i=10, j=13, mask=True, bias="full")
    check_forward(case, dict(causal=True), "float32", "torch", ca.forward)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name,case_kw,kw", _SUBSET, ids=[f[0] for f in _SUBSET])
def test_torch_dtypes(dtype, name, case_kw, kw):
    case = make_case(15, "bhnd", dtype=dtype, **case_kw)
    check_forward(case, kw, dtype)
    check_forward(case, kw, dtype, "torch", ca.forward)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name,case_kw,kw", _SUBSET, ids=[f[0] for f in _SUBSET])
def test_numpy_dtypes(dtype, name, case_kw, kw):
    case = make_case(16, "bhnd", dtype=dtype, framework="numpy", **case_kw)
    check_forward(case, kw, dtype, "numpy", ca.forward)
    check_forward(case, kw, dtype, "numpy", ca.flash_cosine_sim_attention)


@pytest.mark.parametrize("i,j", [(1, 1), (1, 7), (7, 1), (7, 129), (129, 7), (129, 600),
                                 (600, 129), (600, 600), (1000, 1000), (1, 1000), (1000, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_not_multiple_of_tiles(i, j, causal):
    mask = (i, j) in ((129, 600), (600, 600))
    case = make_case(17 + i + j, "bhnd", b=1, h=2, i=i, j=j, d=32, mask=mask,
                     bias="heads" if i == j else None)
    check_forward(case, dict(causal=causal), "float32", "torch", ca.forward)
    npcase = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    check_forward(npcase, dict(causal=causal), "float32", "numpy", ca.forward)


def test_causal_rows_without_visible_key_are_zero():
    i, j = 20, 6
    case = make_case(18, "bhnd", i=i, j=j)
    out, lse = check_forward(case, dict(causal=True), "float32", "torch", ca.forward)
    dead = i - j                          # rows r with r + (j - i) < 0
    assert torch.all(out[:, :, :dead] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :dead]))
    assert torch.all(out[:, :, dead:].abs().sum(-1) > 0)
    assert torch.all(torch.isfinite(lse[:, :, dead:]))


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_fully_masked_rows_give_zero_not_uniform_average(framework):
    case = make_case(19, "bhnd", b=3, mask=True, framework=framework)
    mask = case["mask"]
    mask[1] = False                        # batch 1 sees no key at all
    out, lse = check_forward(case, {}, "float32", framework, ca.forward)
    assert (np.asarray(out[1]) == 0).all()
    assert np.isneginf(np.asarray(lse[1])).all()
    assert (np.abs(np.asarray(out[0])).sum(-1) > 0).all()
    plain = ca.plain_cosine_sim_attention(case["q"], case["k"], case["v"], mask=mask)
    assert (np.asarray(plain[1]) == 0).all()


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("groups", [1, 4])
def test_zero_vectors_normalise_to_zero(framework, groups):
    case = make_case(20, "bhnd", d=16, framework=framework)
    case["q"][0, 0, 2] = 0                 # a whole zero query
    case["q"][1, 1, 3, :4] = 0             # one zero group (of 4) in a query
    case["k"][0, 1, 5] = 0                 # a zero key
    case["k"][1, 0, 0, 4:8] = 0
    out, lse = check_forward(case, dict(groups=groups), "float32", framework, ca.forward)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    # A zero query scores 0 against every key: the plain average of v.
    v = np.asarray(case["v"], dtype=np.float64)
    np.testing.assert_allclose(np.asarray(out[0, 0, 2]), v[0, 0].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_no_l2norm_with_large_norms_stays_exact(framework):
    """l2norm_qk=False with long vectors: the logit range exceeds any fixed softmax shift."""
    case = make_case(21, "bhnd", i=40, j=50, d=16, framework=framework)
    case["q"] = case["q"] * 3
    case["k"] = case["k"] * 3
    check_forward(case, dict(l2norm_qk=False, causal=True), "float32", framework, ca.forward)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_fp16_groups8_scale16_finite_and_accurate(framework):
    """The largest logit is scale * groups = 128: exp must not overflow in float16."""
    case = make_case(22, "bhnd", i=64, j=64, d=64, dtype="float16", framework=framework)
    case["k"] = case["q"].copy() if framework == "numpy" else case["q"].clone()
    out, lse = check_forward(case, dict(groups=8, scale=16), "float16", framework, ca.forward)
    assert np.isfinite(np.asarray(out, dtype=np.float32)).all()
    case["attn_bias"] = randn((2, 64, 64), 23, "float16", framework)
    case["mask"] = rand_mask((2, 64), 24, framework=framework)
    check_forward(case, dict(groups=8, scale=16, causal=True), "float16", framework, ca.forward)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_non_contiguous_inputs(framework):
    b, h, i, j, d = 2, 3, 10, 12, 16
    g = [randn(s, 25 + n, "float32", framework) for n, s in
         enumerate([(b, i, h, d), (b, j, h, d), (b, j, h, d), (j, b), (h, j, i)])]
    tr = (lambda x, a, c: np.swapaxes(x, a, c)) if framework == "numpy" else \
        (lambda x, a, c: x.transpose(a, c))
    q, k, v = (tr(t, 1, 2) for t in g[:3])         # (b, h, n, d) views, not contiguous
    mask = tr(g[3] > -0.5, 0, 1)                    # (b, j) view
    bias = tr(g[4], 1, 2)                           # (h, i, j) view
    assert not (q.is_contiguous() if framework == "torch" else q.flags.c_contiguous)
    case = dict(q=q, k=k, v=v, mask=mask, attn_bias=bias, attn_bias_batch_dim=False)
    check_forward(case, dict(causal=True), "float32", framework, ca.forward)
    check_forward(case, dict(causal=True), "float32", framework, ca.flash_cosine_sim_attention)
    # Every other column of d: a strided last dimension.
    wide = [randn((b, h, n, 2 * d), 30 + n, "float32", framework) for n in (i, j, j)]
    case = dict(q=wide[0][..., ::2], k=wide[1][..., ::2], v=wide[2][..., ::2], mask=None,
                attn_bias=None, attn_bias_batch_dim=False)
    check_forward(case, {}, "float32", framework, ca.forward)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("b,h,i,j", [(0, 2, 5, 6), (2, 0, 5, 6), (2, 2, 0, 6), (2, 2, 5, 0),
                                     (0, 0, 0, 0)])
def test_zero_size(framework, b, h, i, j):
    d = 8
    for layout in ("bhnd", "merged", "single_kv"):
        if layout != "bhnd" and h == 0:
            continue
        case = make_case(31, layout, b=b, h=h, i=i, j=j, d=d, framework=framework,
                         mask=True, bias="heads")
        for causal in (False, True):
            out, lse = check_forward(case, dict(causal=causal), "float32", framework, ca.forward)
            assert (np.asarray(out) == 0).all()
            if j == 0:
                assert np.isneginf(np.asarray(lse)).all()
            out = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], causal=causal)
            assert tuple(out.shape) == tuple(case["q"].shape) and (np.asarray(out) == 0).all()


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_l2norm_tensors(framework, groups):
    dtype = "float32"
    a = randn((2, 3, 5, 16), 40, dtype, framework)
    bb = randn((4, 16), 41, dtype, framework)
    a[0, 0, 0] = 0
    outs = ca.l2norm_tensors(a, bb, groups=groups)
    assert len(outs) == 2
    for x, y in zip((a, bb), outs):
        assert type(y) is type(x) and y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
        assert_close(y, grouped_l2norm_ref(to_f64(x), groups), dtype, "l2norm")
    assert (np.asarray(outs[0][0, 0, 0]) == 0).all()


# ----------------------------------------------------------------------------------------------
# Property test: random shapes x features x frameworks x dtypes, forward output and lse.
# ----------------------------------------------------------------------------------------------

@st.composite
def problems(draw):
    case_kw, kw, prenorm = draw_problem(draw, long_max=700)
    api = draw(st.sampled_from(["functional", "flash"]))
    seed = draw(st.integers(0, 2 ** 20))
    return seed, case_kw, kw, prenorm, api


@given(problems())
def test_property_forward(p):
    seed, case_kw, kw, prenorm, api = p
    case = make_case(seed, **case_kw)
    if prenorm:
        prenormalise(case, kw["groups"])
    fn = ca.forward if api == "functional" else ca.flash_cosine_sim_attention
    check_forward(case, kw, case_kw["dtype"], case_kw["framework"], fn)
