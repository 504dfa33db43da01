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
