"""The original package's known defects (shared reference notes), one test each, so none returns."""
import numpy as np
import pytest
import torch

import cupy_cosine_attn as ca
from conftest import make_case, randn, ref_attention, ref_grads
from tolerances import assert_close, assert_grad_close


def _grads_vs_truth(case, kw, dtype):
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v")]
    out = ca.flash_cosine_sim_attention(*leaves, mask=case["mask"], **kw)
    dout = randn(tuple(out.shape), 5, dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want, floors = ref_grads(case["q"], case["k"], case["v"], dout, mask=case["mask"], out=out,
                             with_floor=True, **kw)
    for g, r, f, name in zip(got, want, floors, ("dq", "dk", "dv")):
        assert_grad_close(g, r, dtype, name, dout.double().norm().item(), kw.get("scale", 8), f)
    return out, got


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_causal_600_matches_reference(framework):
    """Original CPU path skipped the wrong causal tiles: error 3.3 at i = j = 600."""
    case = make_case(1, "bhnd", b=1, h=2, i=600, j=600, d=64, framework=framework)
    out = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], causal=True)
    ref, _ = ref_attention(case["q"], case["k"], case["v"], causal=True)
    assert_close(out, ref, "float32", "out")
    if framework == "torch":
        _grads_vs_truth(case, dict(causal=True), "float32")


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_causal_single_query_row_is_not_all_zeros(framework):
    """Original CPU path returned all zeros for i = 1, j = 1024 causal (the row sees every key)."""
    case = make_case(2, "bhnd", b=1, h=2, i=1, j=1024, d=64, framework=framework)
    out = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], causal=True)
    assert np.abs(np.asarray(out)).sum(-1).min() > 0.01
    ref, _ = ref_attention(case["q"], case["k"], case["v"], causal=True)
    assert_close(out, ref, "float32", "out")
    # Bottom-right alignment: with i = 1 causal equals non-causal.
    full = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"])
    assert_close(out, full, "float32", "causal vs full")
    if framework == "torch":
        _grads_vs_truth(case, dict(causal=True), "float32")


def test_mask_and_causal_can_be_combined():
    """The original asserted that mask and causal are not given together."""
    case = make_case(3, "bhnd", b=2, h=2, i=50, j=80, d=16, mask=True)
    kw = dict(causal=True)
    ref, _ = ref_attention(case["q"], case["k"], case["v"], mask=case["mask"], **kw)
    for fn in (ca.flash_cosine_sim_attention, ca.plain_cosine_sim_attention):
        assert_close(fn(case["q"], case["k"], case["v"], mask=case["mask"], **kw), ref,
                     "float32", fn.__name__)
    # Combined differs from either alone, so both were applied.
    only_mask = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], mask=case["mask"])
    only_causal = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], causal=True)
    assert (ref.float() - only_mask).abs().max() > 1e-3
    assert (ref.float() - only_causal).abs().max() > 1e-3
    _grads_vs_truth(case, kw, "float32")


@pytest.mark.parametrize("fn_name", ["flash_cosine_sim_attention", "plain_cosine_sim_attention",
                                     "forward"])
@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_fully_masked_rows_are_zero_not_uniform_average(fn_name, framework):
    """Original: 0 in the kernel but the uniform average of v in the reference."""
    case = make_case(4, "bhnd", b=2, h=2, i=4, j=6, d=8, framework=framework)
    mask = np.zeros((2, 6), bool) if framework == "numpy" else torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    res = getattr(ca, fn_name)(case["q"], case["k"], case["v"], mask=mask)
    out = np.asarray(res[0] if isinstance(res, tuple) else res)
    assert (out[0] == 0).all()
    assert (np.abs(out[1]).sum(-1) > 0).all()


def test_fully_masked_rows_pass_zero_gradient():
    case = make_case(5, "bhnd", b=2, h=2, i=4, j=6, d=8, bias="full")
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0] = False
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "attn_bias")]
    out = ca.flash_cosine_sim_attention(*leaves[:3], mask=mask, attn_bias=leaves[3])
    out.square().sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all() and (t.grad[0] == 0).all() and t.grad[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_groups_bound_does_not_overflow(dtype):
    """Original subtracted `scale` though the largest logit is `scale * groups` (here 128):
    exp(128 - 16) overflows float16 and even float32."""
    case = make_case(6, "bhnd", b=1, h=2, i=96, j=96, d=64, dtype=dtype)
    case["k"] = case["q"].clone()           # every query's own key reaches the bound
    kw = dict(groups=8, scale=16)
    out = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], **kw)
    assert torch.isfinite(out.float()).all()
    ref, _ = ref_attention(case["q"], case["k"], case["v"], **kw)
    assert_close(out, ref, dtype, "out")
    _grads_vs_truth(case, dict(kw, causal=True), dtype)


@pytest.mark.parametrize("d", [1, 3, 5, 12, 40, 80, 96, 160, 256])
def test_any_head_dim_computes(d):
    """Original: unsupported head dims launched nothing and raised nothing."""
    case = make_case(7, "bhnd", b=1, h=2, i=9, j=10, d=d)
    out = ca.flash_cosine_sim_attention(case["q"], case["k"], case["v"], causal=True)
    assert_close(out, ref_attention(case["q"], case["k"], case["v"], causal=True)[0],
                 "float32", "out")
    _grads_vs_truth(case, dict(causal=True), "float32")


def test_bf16_backward_computes_gradients():
    """Original: bf16 backward silently did nothing."""
    case = make_case(8, "gqa", b=2, h=4, i=33, j=40, d=32, dtype="bfloat16", bias="heads")
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "attn_bias")]
    out = ca.flash_cosine_sim_attention(*leaves[:3], attn_bias=leaves[3], causal=True)
    out.float().square().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.bfloat16
        assert torch.isfinite(t.grad.float()).all() and t.grad.float().abs().sum() > 0
    _grads_vs_truth(case, dict(causal=True), "bfloat16")


def test_cpu_path_has_a_backward():
    """Original: CPU tensors had no backward at all."""
    case = make_case(9, "single_kv", b=2, h=3, i=17, j=19, d=16)
    out, grads = _grads_vs_truth(case, dict(causal=True), "float32")
    assert out.grad_fn is not None
