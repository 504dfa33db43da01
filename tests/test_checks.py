"""Every bad argument listed in the issue raises TypeError/ValueError whose message names the
argument, from every entry point, for torch tensors and NumPy arrays alike."""
import numpy as np
import pytest
import torch

import cupy_cosine_attn as ca
from conftest import randn

B, H, I, J, D = 2, 4, 5, 6, 8


def arr(shape, framework, dtype="float32", seed=0):
    return randn(shape, seed, dtype, framework)


def qkv(framework, dtype="float32", q=(B, H, I, D), kv=(B, H, J, D), v=None):
    return (arr(q, framework, dtype, 1), arr(kv, framework, dtype, 2),
            arr(v or kv, framework, dtype, 3))


def ones_bool(shape, framework):
    return np.ones(shape, bool) if framework == "numpy" else torch.ones(shape, dtype=torch.bool)


def astype(x, dtype):
    return x.astype(dtype) if isinstance(x, np.ndarray) else x.to(getattr(torch, dtype))


def call_backward(q, k, v, **kw):
    """The functional backward checks q, k, v and options before it looks at dout/out/lse."""
    lse = q[..., 0] if hasattr(q, "shape") and q.ndim else q
    return ca.backward(q, q, k, v, q, lse, **kw)


ENTRY_POINTS = {
    "flash": ca.flash_cosine_sim_attention,
    "plain": ca.plain_cosine_sim_attention,
    "forward": ca.forward,
    "backward": call_backward,
}


def input_cases(fw):
    """(id, (q, k, v), exception, pattern naming the argument)."""
    q, k, v = qkv(fw)
    other = "numpy" if fw == "torch" else "torch"
    return [
        ("v_dtype", (q, k, astype(v, "float64")), TypeError, r"\bv\b.*dtype"),
        ("k_dtype", (q, astype(k, "float16"), v), TypeError, r"\bk\b.*dtype"),
        ("int_inputs", tuple(astype(t, "int32") for t in (q, k, v)), TypeError,
         r"q, k, v must be floating"),
        ("bool_inputs", tuple(t > 0 for t in (q, k, v)), TypeError, r"q, k, v must be floating"),
        ("k_other_framework", (q, arr(k.shape, other), v), TypeError, r"^k is a"),
        ("v_other_framework", (q, k, arr(v.shape, other)), TypeError, r"^v is a"),
        ("list_q", ([[1.0]], k, v), TypeError, r"^q must be"),
        ("batch", qkv(fw, kv=(B + 1, H, J, D)), ValueError, r"k/v batch .* q batch"),
        ("batch_single_kv", qkv(fw, kv=(B + 1, J, D)), ValueError, r"k/v batch"),
        ("head_dim", qkv(fw, kv=(B, H, J, D * 2)), ValueError, r"k/v head dim .* q head dim"),
        ("heads_not_divisible", qkv(fw, kv=(B, 3, J, D)), ValueError,
         r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
        ("more_kv_heads", qkv(fw, kv=(B, 8, J, D)), ValueError, r"q heads.*k/v heads"),
        ("k_v_shapes", qkv(fw, v=(B, H, J + 1, D)), ValueError, r"k and v must have the same"),
        ("k_v_ranks", (q, k, arr((B, J, D), fw)), ValueError, r"k and v"),
        ("q_rank_2", (q[0, 0], k, v), ValueError, r"^q must be"),
        ("q_rank_5", (q[None], k, v), ValueError, r"^q must be"),
        ("kv_rank_5", (q, k[None], v[None]), ValueError, r"k and v"),
        ("kv_rank_2", (q, k[0, 0], v[0, 0]), ValueError, r"k and v"),
        ("merged_q_4d_kv", (q[:, 0], k, v), ValueError, r"merged .*k and v must be 3-dim"),
    ]


def option_cases(fw):
    """(id, kwargs, exception, pattern)."""
    other = "numpy" if fw == "torch" else "torch"
    return [
        ("mask_float", dict(mask=astype(ones_bool((B, J), fw), "float32")), TypeError,
         r"mask must be a bool"),
        ("mask_int", dict(mask=astype(ones_bool((B, J), fw), "int64")), TypeError,
         r"mask must be a bool"),
        ("mask_shape_j", dict(mask=ones_bool((B, J - 1), fw)), ValueError, r"mask must have shape"),
        ("mask_shape_b", dict(mask=ones_bool((B + 1, J), fw)), ValueError, r"mask must have shape"),
        ("mask_1d", dict(mask=ones_bool((J,), fw)), ValueError, r"mask must have shape"),
        ("mask_3d", dict(mask=ones_bool((B, 1, J), fw)), ValueError, r"mask must have shape"),
        ("mask_other_framework", dict(mask=ones_bool((B, J), other)), TypeError, r"^mask must"),
        ("bias_shape_j", dict(attn_bias=arr((H, I, J + 1), fw)), ValueError,
         r"attn_bias must have shape"),
        ("bias_shape_i", dict(attn_bias=arr((H, I + 1, J), fw)), ValueError,
         r"attn_bias must have shape"),
        ("bias_batch_without_flag", dict(attn_bias=arr((B, I, J), fw)), ValueError,
         r"attn_bias must have shape"),
        ("bias_heads_with_batch_flag", dict(attn_bias=arr((H, I, J), fw), attn_bias_batch_dim=True),
         ValueError, r"attn_bias must have shape"),
        ("bias_2d", dict(attn_bias=arr((I, J), fw)), ValueError, r"attn_bias must have shape"),
        ("bias_5d", dict(attn_bias=arr((1, B, H, I, J), fw)), ValueError,
         r"attn_bias must have shape"),
        ("bias_dtype", dict(attn_bias=arr((H, I, J), fw, "float64")), TypeError,
         r"attn_bias must have q's dtype"),
        ("bias_int", dict(attn_bias=astype(arr((H, I, J), fw), "int32")), TypeError, r"attn_bias"),
        ("bias_other_framework", dict(attn_bias=arr((H, I, J), other)), TypeError, r"^attn_bias"),
        ("scale_zero", dict(scale=0), ValueError, r"scale"),
        ("scale_negative", dict(scale=-1.5), ValueError, r"scale"),
        ("scale_inf", dict(scale=float("inf")), ValueError, r"scale"),
        ("scale_nan", dict(scale=float("nan")), ValueError, r"scale"),
        ("scale_str", dict(scale="8"), TypeError, r"scale"),
        ("scale_none", dict(scale=None), TypeError, r"scale"),
        ("groups_not_dividing", dict(groups=3), ValueError, r"groups=3 must divide .*d=8"),
        ("groups_too_big", dict(groups=16), ValueError, r"groups"),
        ("groups_zero", dict(groups=0), ValueError, r"groups"),
        ("groups_negative", dict(groups=-2), ValueError, r"groups"),
        ("groups_float", dict(groups=2.0), TypeError, r"groups"),
        ("causal_str", dict(causal="yes"), TypeError, r"causal"),
        ("l2norm_none", dict(l2norm_qk=None), TypeError, r"l2norm_qk"),
        ("batch_dim_int", dict(attn_bias_batch_dim=1), TypeError, r"attn_bias_batch_dim"),
    ]


def _ids(cases):
    return [c[0] for c in cases]


def error_cases(fw):
    """(name, positional args, keyword args, exception, message pattern): bad arrays, then bad
    options on good arrays."""
    return ([(name, args, {}, exc, pat) for name, args, exc, pat in input_cases(fw)]
            + [(name, qkv(fw), kw, exc, pat) for name, kw, exc, pat in option_cases(fw)])


@pytest.mark.parametrize("fw", ["torch", "numpy"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("idx", range(len(error_cases("numpy"))), ids=_ids(error_cases("numpy")))
def test_argument_errors(fw, entry, idx):
    name, args, kw, exc, pattern = error_cases(fw)[idx]
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[entry](*args, **kw)


@pytest.mark.parametrize("name,make,match", [
    ("k", lambda q, k, v: (q, k.to("meta"), v), r"^k is on meta"),
    ("v", lambda q, k, v: (q, k, v.to("meta")), r"^v is on meta"),
])
def test_mismatched_devices(name, make, match):
    """A torch device other than q's (the meta device stands in for a GPU here)."""
    for entry in ENTRY_POINTS.values():
        with pytest.raises(ValueError, match=match):
            entry(*make(*qkv("torch")))


def test_mask_and_bias_on_other_device():
    q, k, v = qkv("torch")
    with pytest.raises(ValueError, match=r"^mask is on meta"):
        ca.flash_cosine_sim_attention(q, k, v, mask=torch.ones(B, J, dtype=torch.bool,
                                                               device="meta"))
    with pytest.raises(ValueError, match=r"^attn_bias is on meta"):
        ca.forward(q, k, v, attn_bias=torch.zeros(H, I, J, device="meta"))


def test_merged_bias_shape():
    q, k, v = qkv("torch", q=(B * H, I, D), kv=(B * H, J, D))
    ca.forward(q, k, v, attn_bias=arr((B * H, I, J), "torch"))          # the accepted form
    for shape in ((H, I, J), (B, H, I, J), (B * H, I, J + 1)):
        with pytest.raises(ValueError, match="attn_bias must have shape"):
            ca.forward(q, k, v, attn_bias=arr(shape, "torch"))


def test_valid_calls_do_not_raise():
    """The checks reject only bad arguments: every accepted form runs."""
    for fw in ("torch", "numpy"):
        q, k, v = qkv(fw)
        for kw in (dict(attn_bias=arr((H, I, J), fw)),
                   dict(attn_bias=arr((B, I, J), fw), attn_bias_batch_dim=True),
                   dict(attn_bias=arr((B, H, I, J), fw)),
                   dict(mask=ones_bool((B, J), fw), causal=True, groups=8, scale=1e-3),
                   dict(scale=np.float32(4.0), groups=np.int64(2), causal=np.bool_(True))):
            ca.forward(q, k, v, **kw)
        ca.forward(*qkv(fw, kv=(B, 2, J, D)))
        ca.forward(*qkv(fw, kv=(B, J, D)))


@pytest.mark.parametrize("fw", ["torch", "numpy"])
def test_backward_checks_dout_out_lse(fw):
    q, k, v = qkv(fw)
    out, lse = ca.forward(q, k, v)
    ca.backward(out, q, k, v, out, lse)                                 # accepted
    bad = [
        ((out[:, :1], q, k, v, out, lse), ValueError, r"^dout must have shape"),
        ((astype(out, "float64"), q, k, v, out, lse), TypeError, r"^dout must have dtype"),
        ((out, q, k, v, out[..., :4], lse), ValueError, r"^out must have shape"),
        ((out, q, k, v, astype(out, "float16"), lse), TypeError, r"^out must have dtype"),
        ((out, q, k, v, out, lse[..., :2]), ValueError, r"^lse must have shape"),
        ((out, q, k, v, out, astype(lse, "float64")), TypeError, r"^lse must have dtype"),
        ((out, q, k, v, out, astype(lse, "float16")), TypeError, r"^lse must have dtype"),
        ((arr(out.shape, "numpy" if fw == "torch" else "torch"), q, k, v, out, lse), TypeError,
         r"^dout must be"),
    ]
    for args, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            ca.backward(*args)


@pytest.mark.parametrize("fw", ["torch", "numpy"])
def test_l2norm_tensors_checks(fw):
    with pytest.raises(ValueError, match="groups"):
        ca.l2norm_tensors(arr((2, 6), fw), groups=4)
    with pytest.raises(ValueError, match="groups"):
        ca.l2norm_tensors(arr((2, 8), fw), groups=0)
    with pytest.raises(ValueError):
        ca.l2norm_tensors()



def test_any_dlpack_array_is_taken_in():
    import numpy as np
    from helpers import ForeignDLPack
    import cupy_cosine_attn as ca
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 9, 16)).astype(np.float32) for _ in range(3))
    ref_out, ref_lse = ca.forward(q, k, v, causal=True)
    out, lse = ca.forward(ForeignDLPack(q), ForeignDLPack(k), ForeignDLPack(v), causal=True)
    assert isinstance(out, np.ndarray) and np.array_equal(out, ref_out) and np.array_equal(lse, ref_lse)
    out2 = ca.flash_cosine_sim_attention(ForeignDLPack(q), k, v, causal=True)
    assert np.array_equal(out2, ref_out)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    grads = ca.backward(ForeignDLPack(dout), q, k, v, ForeignDLPack(out), lse, causal=True)
    assert all(np.array_equal(a, b) for a, b in zip(grads[:3], ca.backward(dout, q, k, v, out, lse, causal=True)[:3]))


def test_dlpack_array_on_an_unsupported_device_is_a_clear_error():
    import numpy as np
    from helpers import ForeignDLPack
    import cupy_cosine_attn as ca

    class OnSomeAccelerator(ForeignDLPack):
        def __dlpack_device__(self):
            return (7, 0)                   # kDLVulkan
    q = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(TypeError, match="k is on DLPack device type 7"):
        ca.forward(q, OnSomeAccelerator(q), q)
    with pytest.raises(TypeError, match="q must be a NumPy array"):
        ca.forward([[1.0]], q, q)
