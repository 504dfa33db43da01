"""Tile boundaries of the CPU path: small explicit tiles against the float64 reference."""
import pytest
import torch

from cupy_cosine_attn import cpu_tiled
from cupy_cosine_attn.problem import make_problem
from cupy_cosine_attn.reference import reference_forward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("row_tile,col_tile", [(64, 96), (1024, 512), (7, 13)])
def test_tiles_match_reference(causal, row_tile, col_tile):
    g = torch.Generator().manual_seed(row_tile + col_tile + causal)
    q = torch.randn(2, 4, 150, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 170, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 170, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 150, 170, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 170, generator=g) > 0.2
    p = make_problem(q.detach(), k.detach(), v.detach(), mask, bias.detach(), causal=causal, groups=2)
    out, lse = cpu_tiled.tiled_forward(p, row_tile, col_tile)
    ref, ref_lse = reference_forward(make_problem(q, k, v, mask, bias, causal=causal, groups=2))
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = cpu_tiled.tiled_backward(p, dout, out, lse, row_tile, col_tile)
    ref_grads = torch.autograd.grad(ref, (q, k, v, bias), dout)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.reshape(want.shape), want, atol=1e-10)
