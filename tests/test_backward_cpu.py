"""CPU backward (torch autograd through flash_cosine_sim_attention, and the functional
`backward` for NumPy and torch) against float64 autograd of conftest.ref_attention: dq, dk, dv
and dbias for every layout, feature, bias form, dtype and edge case, plus float64 gradcheck."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import cupy_cosine_attn as ca
from conftest import (FEATURE_IDS, FEATURES, LAYOUTS, draw_problem, make_case, prenormalise, randn,
                      ref_attention, ref_grads, to_f64)
from tolerances import assert_close, assert_grad_close, rel_err

KW = ("mask", "attn_bias", "attn_bias_batch_dim")



def _np(x):
    return x if x is None or isinstance(x, np.ndarray) else x.detach().numpy()


def check_backward(case, extra, dtype, framework="torch", api="autograd", dout_seed=99):
    """Gradients of one entry point against the float64 truth; returns (dq, dk, dv, dbias)."""
    kw = {k: case[k] for k in KW}
    kw.update(extra)
    q, k, v, bias = case["q"], case["k"], case["v"], case["attn_bias"]
    dout = randn(tuple(q.shape), dout_seed, dtype, framework)
    if api == "autograd":
        assert framework == "torch"
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        b_leaf = None if bias is None else bias.detach().clone().requires_grad_()
        kw["attn_bias"] = b_leaf
        out = ca.flash_cosine_sim_attention(*leaves, **kw)
        wrt = leaves + ([b_leaf] if b_leaf is not None else [])
        grads = list(torch.autograd.grad(out, wrt, dout))
        if b_leaf is None:
            grads.append(None)
    else:
        out, lse = ca.forward(q, k, v, **kw)
        grads = ca.backward(dout, q, k, v, out, lse, **kw)
        assert isinstance(grads, tuple) and len(grads) == 4
    kw["attn_bias"] = bias
    want, floors = ref_grads(q, k, v, dout, out=out, with_floor=True, **kw)
    want_type = torch.Tensor if framework == "torch" else np.ndarray
    for name, got, ref, floor, x in zip(("dq", "dk", "dv", "dbias"), grads, want, floors,
                                        (q, k, v, bias)):
        if x is None:
            assert got is None, f"{name} should be None without attn_bias"
            continue
        assert isinstance(got, want_type), (name, type(got))
        assert tuple(got.shape) == tuple(x.shape), (name, tuple(got.shape), tuple(x.shape))
        assert got.dtype == x.dtype, (name, got.dtype, x.dtype)
        assert_grad_close(got, ref, dtype, name, float(np.linalg.norm(_np(to_f64(dout)).ravel())),
                          extra.get("scale", 8), floor)
    return grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,case_kw,kw", FEATURES, ids=FEATURE_IDS)
def test_torch_autograd_layouts_and_features(layout, name, case_kw, kw):
    case_kw = dict(dict(h=4), **case_kw)
    for dtype in ("float64", "float32"):
        check_backward(make_case(51, layout, dtype=dtype, **case_kw), kw, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,case_kw,kw", FEATURES, ids=FEATURE_IDS)
def test_numpy_functional_backward(layout, name, case_kw, kw):
    case_kw = dict(dict(h=4), **case_kw)
    for dtype in ("float64", "float32"):
        check_backward(make_case(52, layout, dtype=dtype, framework="numpy", **case_kw), kw,
                       dtype, "numpy", "functional")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_functional_backward(layout):
    case = make_case(53, layout, h=4, i=10, j=13, mask=True, bias="heads")
    check_backward(case, dict(causal=True, groups=2), "float32", "torch", "functional")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name,case_kw,kw", [FEATURES[i] for i in (0, 3, 5, 8, 10, 11)],
                         ids=[FEATURE_IDS[i] for i in (0, 3, 5, 8, 10, 11)])
def test_torch_dtypes(dtype, name, case_kw, kw):
    check_backward(make_case(54, "gqa", h=4, dtype=dtype, **case_kw), kw, dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name,case_kw,kw", [FEATURES[i] for i in (0, 3, 5, 8, 10, 11)],
                         ids=[FEATURE_IDS[i] for i in (0, 3, 5, 8, 10, 11)])
def test_numpy_dtypes(dtype, name, case_kw, kw):
    check_backward(make_case(55, "gqa", h=4, dtype=dtype, framework="numpy", **case_kw), kw,
                   dtype, "numpy", "functional")


@pytest.mark.parametrize("i,j", [(1, 7), (7, 1), (129, 600), (600, 129), (600, 600), (1, 1000),
                                 (1000, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_not_multiple_of_tiles(i, j, causal):
    case = make_case(56 + i + j, "gqa", b=1, h=2, hk=1, i=i, j=j, d=32, mask=(i == j),
                     bias="heads" if i * j < 100_000 else None)
    check_backward(case, dict(causal=causal), "float32")
    npcase = {k: _np(v) if not isinstance(v, bool) else v for k, v in case.items()}
    check_backward(npcase, dict(causal=causal), "float32", "numpy", "functional")


@pytest.mark.parametrize("layout,form,shape", [
    ("bhnd", "heads", (3, 6, 7)), ("bhnd", "batch", (2, 6, 7)), ("bhnd", "full", (2, 3, 6, 7)),
    ("single_kv", "heads", (3, 6, 7)), ("merged", None, (6, 6, 7))])
def test_bias_gradient_has_the_bias_shape(layout, form, shape):
    case = make_case(57, layout, b=2, h=3, i=6, j=7, bias=form or "heads", dtype="float64")
    assert tuple(case["attn_bias"].shape) == shape
    dq, dk, dv, db = check_backward(case, dict(causal=True), "float64")
    assert tuple(db.shape) == shape and db.abs().sum() > 0


def test_sum_loss_backward_with_expanded_upstream_gradient():
    """out.sum().backward() hands the op a stride-0 upstream gradient."""
    case = make_case(58, "gqa", h=4, mask=True, bias="full")
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "attn_bias")]
    out = ca.flash_cosine_sim_attention(*leaves[:3], mask=case["mask"], attn_bias=leaves[3],
                                        causal=True)
    out.sum().backward()
    want = ref_grads(case["q"], case["k"], case["v"], torch.ones(out.shape), mask=case["mask"],
                     attn_bias=case["attn_bias"], out=out, causal=True)
    for leaf, ref, name in zip(leaves, want, ("dq", "dk", "dv", "dbias")):
        assert_close(leaf.grad, ref, "float32", name)


def test_no_l2norm_gradients_flow_to_q_and_k():
    case = make_case(59, "bhnd", dtype="float64")
    for kw in (dict(l2norm_qk=False), dict(l2norm_qk=True)):
        dq, dk, dv, _ = check_backward(case, kw, "float64")
        assert dq.abs().sum() > 0 and dk.abs().sum() > 0
    # With l2norm_qk=True the gradient is orthogonal to q within each group (it flows through
    # the normalisation); with False it is not.
    case["q"] = case["q"].detach()
    dq_n = check_backward(case, dict(l2norm_qk=True), "float64")[0]
    dq_raw = check_backward(case, dict(l2norm_qk=False), "float64")[0]
    radial = lambda g: (g * case["q"]).sum(-1).abs().max().item()
    assert radial(dq_n) < 1e-10 < radial(dq_raw)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("groups", [1, 4])
def test_zero_vectors_pass_zero_gradient(framework, groups):
    case = make_case(60, "bhnd", d=16, dtype="float64", framework=framework)
    case["q"][0, 0, 2] = 0
    case["k"][1, 1, 4] = 0
    case["q"][1, 0, 1, 4:8] = 0           # one zero group
    api = "autograd" if framework == "torch" else "functional"
    dq, dk, dv, _ = (_np(g) for g in check_backward(case, dict(groups=groups), "float64",
                                                     framework, api))
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    assert (dq[0, 0, 2] == 0).all() and (dk[1, 1, 4] == 0).all()
    if groups == 4:
        assert (dq[1, 0, 1, 4:8] == 0).all() and (dq[1, 0, 1, :4] != 0).any()


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_fully_masked_rows_pass_zero_gradient(framework):
    case = make_case(61, "bhnd", b=3, mask=True, bias="full", framework=framework)
    case["mask"][1] = False
    api = "autograd" if framework == "torch" else "functional"
    dq, dk, dv, db = (_np(g) for g in check_backward(case, {}, "float32", framework, api))
    for g in (dq, dk, dv, db):
        assert (g[1] == 0).all()
        assert (np.abs(g[0]).sum() > 0)


def test_causal_rows_without_visible_key_pass_zero_gradient():
    i, j = 20, 6
    case = make_case(62, "bhnd", i=i, j=j, bias="heads")
    dq, dk, dv, db = check_backward(case, dict(causal=True), "float32")
    # Row i - j sees exactly one key (softmax constant: zero gradient up to rounding); later rows
    # see more and get a real gradient.
    assert (dq[:, :, : i - j] == 0).all() and (dq[:, :, i - j + 1:].abs().sum(-1) > 1e-3).all()
    assert (db[:, : i - j] == 0).all()


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("hide", ["mask", "causal"])
def test_hidden_keys_far_above_the_row_lse(framework, hide):
    """A hidden key whose logit exceeds the row's lse by more than float32's exp range
    (here 2 * scale = 100 nats): exp(s - lse) of hidden keys must never reach the gradients."""
    d = 8
    q = randn((1, 1, 2, d), 1, "float32", framework)
    k = randn((1, 1, 2, d), 2, "float32", framework)
    v = randn((1, 1, 2, d), 3, "float32", framework)
    k[0, 0, 0] = -q[0, 0, 0]               # row 0 sees key 0 only: logit -scale
    k[0, 0, 1] = q[0, 0, 0]                # key 1 is hidden from row 0: logit +scale
    kw = dict(scale=50.0)
    if hide == "mask":
        kw["mask"] = np.array([[True, False]])
        if framework == "torch":
            kw["mask"] = torch.from_numpy(kw["mask"])
    else:
        kw["causal"] = True
    case = dict(q=q, k=k, v=v, mask=kw.pop("mask", None), attn_bias=None,
                attn_bias_batch_dim=False)
    api = "autograd" if framework == "torch" else "functional"
    check_backward(case, kw, "float32", framework, api)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_non_contiguous_inputs(framework):
    b, h, i, j, d = 2, 3, 10, 12, 16
    g = [randn(s, 63 + n, "float32", framework) for n, s in
         enumerate([(b, i, h, d), (b, j, h, d), (b, j, h, d), (h, j, i)])]
    tr = (lambda x: np.swapaxes(x, 1, 2)) if framework == "numpy" else (lambda x: x.transpose(1, 2))
    case = dict(q=tr(g[0]), k=tr(g[1]), v=tr(g[2]), mask=None, attn_bias=tr(g[3]),
                attn_bias_batch_dim=False)
    api = "autograd" if framework == "torch" else "functional"
    check_backward(case, dict(causal=True), "float32", framework, api)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_fp16_groups8_scale16_gradients(framework):
    """Logits up to scale * groups = 128 in float16: gradients finite and accurate."""
    case = make_case(64, "bhnd", i=48, j=48, d=64, dtype="float16", framework=framework,
                     bias="heads")
    api = "autograd" if framework == "torch" else "functional"
    check_backward(case, dict(groups=8, scale=16, causal=True), "float16", framework, api)
    # k = q: every row's own key reaches the bound 128 (near one-hot softmax, tiny gradients).
    case["k"] = case["q"].copy() if framework == "numpy" else case["q"].clone()
    check_backward(case, dict(groups=8, scale=16, causal=True), "float16", framework, api)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("b,h,i,j", [(0, 2, 5, 6), (2, 0, 5, 6), (2, 2, 0, 6), (2, 2, 5, 0)])
def test_zero_size(framework, b, h, i, j):
    api = "autograd" if framework == "torch" else "functional"
    for bias in (None, "full"):
        case = make_case(65, "bhnd", b=b, h=h, i=i, j=j, d=8, framework=framework, mask=True,
                         bias=bias)
        grads = check_backward(case, dict(causal=True), "float32", framework, api)
        for g in grads:
            assert g is None or (np.asarray(_np(g)) == 0).all()


def test_plain_reference_is_differentiable():
    case = make_case(66, "gqa", h=4, dtype="float64", mask=True, bias="heads")
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "attn_bias")]
    out = ca.plain_cosine_sim_attention(*leaves[:3], mask=case["mask"], attn_bias=leaves[3],
                                        causal=True, groups=2)
    dout = randn(tuple(out.shape), 67, "float64")
    got = torch.autograd.grad(out, leaves, dout)
    want = ref_grads(case["q"], case["k"], case["v"], dout, mask=case["mask"],
                     attn_bias=case["attn_bias"], causal=True, groups=2)
    for g, r, name in zip(got, want, ("dq", "dk", "dv", "dbias")):
        assert_close(g, r, "float64", name)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64 through the public torch entry point
# ----------------------------------------------------------------------------------------------

GRADCHECK = [
    ("plain", "bhnd", {}, {}),
    ("mask_causal", "bhnd", dict(mask=True), dict(causal=True)),
    ("causal_i_gt_j", "bhnd", dict(i=6, j=3), dict(causal=True)),
    ("bias_heads", "bhnd", dict(bias="heads"), {}),
    ("bias_batch", "bhnd", dict(bias="batch"), dict(causal=True)),
    ("bias_full", "bhnd", dict(bias="full", mask=True), {}),
    ("groups2", "bhnd", {}, dict(groups=2)),
    ("no_l2norm", "bhnd", {}, dict(l2norm_qk=False)),
    ("merged_bias", "merged", dict(bias="heads"), dict(causal=True)),
    ("single_kv", "single_kv", dict(bias="heads"), {}),
    ("gqa", "gqa", dict(h=4, hk=2, mask=True), dict(causal=True, scale=3.0)),
]


@pytest.mark.parametrize("name,layout,case_kw,kw", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_float64(name, layout, case_kw, kw):
    case_kw = dict(dict(b=2, h=2, i=4, j=5, d=8), **case_kw)
    case = make_case(70, layout, dtype="float64", **case_kw)
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    bias = case["attn_bias"]
    inputs = (q, k, v) + ((bias.clone().requires_grad_(),) if bias is not None else ())

    def fn(q, k, v, bias=None):
        return ca.flash_cosine_sim_attention(q, k, v, mask=case["mask"], attn_bias=bias,
                                             attn_bias_batch_dim=case["attn_bias_batch_dim"],
                                             **kw)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Property test: every gradient over random shapes, features, dtypes and both frameworks.
# ----------------------------------------------------------------------------------------------

@st.composite
def problems(draw):
    case_kw, kw, prenorm = draw_problem(draw, long_max=600)
    api = "functional" if case_kw["framework"] == "numpy" else draw(st.sampled_from(["autograd",
                                                                                     "functional"]))
    return draw(st.integers(0, 2 ** 20)), case_kw, kw, prenorm, api


@given(problems())
def test_property_backward(p):
    seed, case_kw, kw, prenorm, api = p
    case = make_case(seed, **case_kw)
    if prenorm:
        prenormalise(case, kw["groups"])
    check_backward(case, kw, case_kw["dtype"], case_kw["framework"], api, dout_seed=seed + 7)
