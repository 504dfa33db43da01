"""Every bad argument raises TypeError/ValueError naming the argument, before any work."""
import numpy as np
import pytest
import torch

import cupy_cosine_attn as ca


def qkv(b=2, h=4, i=5, j=6, d=8, hk=None, dtype=torch.float32):
    hk = h if hk is None else hk
    return (torch.randn(b, h, i, d, dtype=dtype), torch.randn(b, hk, j, d, dtype=dtype),
            torch.randn(b, hk, j, d, dtype=dtype))


FNS = [ca.flash_cosine_sim_attention, ca.plain_cosine_sim_attention,
       lambda *a, **kw: ca.forward(*a, **kw)]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("make,exc,match", [
    (lambda: (*qkv()[:2], qkv()[2].double()), TypeError, "v has dtype"),
    (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), TypeError, "k has dtype"),
    (lambda: (qkv()[0].int(), qkv()[1].int(), qkv()[2].int()), TypeError, "floating point"),
    (lambda: (qkv()[0], np.zeros((2, 4, 6, 8), np.float32), qkv()[2]), TypeError, "k is a numpy"),
    (lambda: (qkv(b=3)[0], *qkv()[1:]), ValueError, "batch"),
    (lambda: (qkv(d=16)[0], *qkv()[1:]), ValueError, "head dim"),
    (lambda: (qkv(h=3)[0], *qkv(hk=2)[1:]), ValueError, "multiple of k/v heads"),
    (lambda: (qkv()[0], qkv()[1], qkv(j=7)[2]), ValueError, "same shape"),
    (lambda: (qkv()[0][0, 0], *qkv()[1:]), ValueError, "q must be"),
    (lambda: (qkv()[0][None], *qkv()[1:]), ValueError, "q must be"),
    (lambda: (qkv()[0][:, 0], *qkv()[1:]), ValueError, "merged"),
])
def test_input_errors(fn, make, exc, match):
    with pytest.raises(exc, match=match):
        fn(*make())


@pytest.mark.parametrize("kw,exc,match", [
    (dict(mask=torch.ones(2, 6)), TypeError, "mask must be a bool"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.ones(6, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=np.ones((2, 6), bool)), TypeError, "mask must be a torch"),
    (dict(attn_bias=torch.randn(4, 5, 7)), ValueError, "attn_bias must have shape"),
    (dict(attn_bias=torch.randn(2, 5, 6)), ValueError, "attn_bias must have shape"),
    (dict(attn_bias=torch.randn(4, 5, 6), attn_bias_batch_dim=True), ValueError, "attn_bias"),
    (dict(attn_bias=torch.randn(4, 5, 6).double()), TypeError, "attn_bias must have q's dtype"),
    (dict(attn_bias=torch.ones(4, 5, 6, dtype=torch.int32)), TypeError, "attn_bias"),
    (dict(scale=0), ValueError, "scale"),
    (dict(scale=-2.0), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale="8"), TypeError, "scale"),
    (dict(groups=3), ValueError, "groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(groups=2.0), TypeError, "groups"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(l2norm_qk=None), TypeError, "l2norm_qk"),
    (dict(attn_bias_batch_dim=1), TypeError, "attn_bias_batch_dim"),
])
@pytest.mark.parametrize("fn", FNS)
def test_option_errors(fn, kw, exc, match):
    with pytest.raises(exc, match=match):
        fn(*qkv(), **kw)


def test_backward_checks_its_arrays():
    q, k, v = (x.numpy() for x in qkv())
    out, lse = ca.forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        ca.backward(out[:, :1], q, k, v, out, lse)
    with pytest.raises(TypeError, match="lse"):
        ca.backward(out, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match="out"):
        ca.backward(out, q, k, v, out[..., :4], lse)


def test_unsupported_array_type():
    with pytest.raises(TypeError, match="q must be"):
        ca.forward([[1.0]], [[1.0]], [[1.0]])


def test_l2norm_tensors_checks_groups():
    with pytest.raises(ValueError, match="groups"):
        ca.l2norm_tensors(torch.randn(2, 6), groups=4)
    with pytest.raises(ValueError, match="at least one"):
        ca.l2norm_tensors()
