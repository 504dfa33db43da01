"""torch integration on the GPU: torch.compile without graph breaks, non-default streams."""
import pytest

from gpu_support import require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import torch  # noqa: E402

import cupy_cosine_attn as ca  # noqa: E402
from helpers import rel_err, truth  # noqa: E402


def _qkv(dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, 4, 100, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
            for _ in range(3)]


def test_compile_fullgraph_cuda():
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: ca.flash_cosine_sim_attention(q, k, v, causal=True) * 2,
                      fullgraph=True)
    out = f(q, k, v)
    ref = ca.flash_cosine_sim_attention(q, k, v, causal=True) * 2
    assert torch.equal(out, ref)
    g1 = torch.autograd.grad(out.float().sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.float().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-2   # dq uses fp32 atomics: order may differ


def test_runs_on_the_current_non_default_stream():
    q, k, v = _qkv(torch.bfloat16, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ca.flash_cosine_sim_attention(q, k, v)
        out.float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert rel_err(out, truth(q, k, v)[0]) < 1e-2
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eager_function_and_custom_op_agree_on_the_gpu(dtype):
    """Eager calls (the autograd.Function, DLPack capsules taken directly) and the custom op give
    the same output bit for bit, and the same gradients with deterministic=True."""
    from cupy_cosine_attn.torch_ops import attn_forward
    q, k, v = _qkv(dtype, seed=4)
    out = ca.flash_cosine_sim_attention(q, k, v, causal=True, deterministic=True)
    assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    ref, _ = attn_forward(q, k, v, None, None, 8.0, 1, True, True, False, True)
    assert torch.equal(out, ref)
    assert rel_err(out, truth(q, k, v, causal=True)[0]) < 2e-2
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("layout", ["merged-groups", "gqa-mask-bias"])
def test_eager_reuses_the_forward_normalisation_and_matches_the_op(layout):
    """The eager path keeps the forward's normalised q, k and norms for the backward (the op
    normalises again): the same gradients bit for bit with deterministic=True, for merged
    (b*h, n, d) inputs with grouped norms, and for GQA with a key mask and a bias."""
    from cupy_cosine_attn.torch_ops import attn_forward
    g = torch.Generator(device="cuda").manual_seed(7)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    mask = bias = None
    if layout == "merged-groups":
        q, k, v, groups = rand(6, 77, 128), rand(6, 91, 128), rand(6, 91, 128), 4
    else:
        q, k, v, groups = rand(2, 4, 70, 64), rand(2, 2, 133, 64), rand(2, 2, 133, 64), 1
        mask = torch.rand(2, 133, device="cuda", generator=g) > 0.3
        bias = rand(4, 70, 133).requires_grad_()
    for x in (q, k, v):
        x.requires_grad_()
    leaves = tuple(x for x in (q, k, v, bias) if x is not None)
    out = ca.flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, groups=groups,
                                        deterministic=True)
    ref, _ = attn_forward(q, k, v, mask, bias, 8.0, groups, False, True, False, True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, leaves, dout)):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_eager_gradients_are_those_of_the_forwards_q_and_k():
    """The eager backward reads the normalised q and k saved by the forward, not q and k: a
    later in-place change to q or k neither raises nor changes the gradients (v, still saved
    itself, is refused as usual)."""
    q, k, v = _qkv(torch.float16, seed=5)
    clones = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = ca.flash_cosine_sim_attention(q, k, v, causal=True, deterministic=True)
    ref = ca.flash_cosine_sim_attention(*clones, causal=True, deterministic=True)
    with torch.no_grad():
        q.mul_(-3.0)
        k.add_(1.0)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, clones, dout)):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    out = ca.flash_cosine_sim_attention(q, k, v)
    with torch.no_grad():
        v.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.float().sum().backward()
