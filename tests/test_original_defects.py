"""The original package's known defects (../shared/reference/README.md), each a test here."""
import numpy as np
import torch

import cupy_cosine_attn as ca
from helpers import assert_close, truth


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def test_causal_600_matches_reference():
    """Original CPU path skipped the wrong causal tiles: error 3.3 at i = j = 600."""
    q, k, v = rand(1, 2, 600, 64, seed=1), rand(1, 2, 600, 64, seed=2), rand(1, 2, 600, 64, seed=3)
    out = ca.flash_cosine_sim_attention(q, k, v, causal=True)
    assert_close(out, truth(q, k, v, causal=True)[0], "float32")


def test_causal_single_query_row_not_zero():
    """Original CPU path returned all zeros for i = 1, j = 1024 causal."""
    q, k, v = rand(1, 2, 1, 64, seed=1), rand(1, 2, 1024, 64, seed=2), rand(1, 2, 1024, 64, seed=3)
    out = ca.flash_cosine_sim_attention(q, k, v, causal=True)
    assert out.abs().sum() > 0
    assert_close(out, truth(q, k, v, causal=True)[0], "float32")


def test_mask_and_causal_combine():
    q, k, v = rand(2, 2, 50, 16, seed=1), rand(2, 2, 80, 16, seed=2), rand(2, 2, 80, 16, seed=3)
    mask = rand(2, 80, seed=4) > 0
    out = ca.flash_cosine_sim_attention(q, k, v, mask=mask, causal=True)
    assert_close(out, truth(q, k, v, mask=mask, causal=True)[0], "float32")


def test_fully_masked_rows_are_zero_in_every_path():
    """Original: 0 in the kernel but a uniform average in the reference."""
    q, k, v = rand(1, 1, 4, 8, seed=1), rand(1, 1, 6, 8, seed=2), rand(1, 1, 6, 8, seed=3)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    for fn in (ca.flash_cosine_sim_attention, ca.plain_cosine_sim_attention):
        assert fn(q, k, v, mask=mask).abs().max() == 0
    assert np.abs(ca.forward(q.numpy(), k.numpy(), v.numpy(), mask=mask.numpy())[0]).max() == 0


def test_groups_bound_does_not_overflow_fp16():
    """Original subtracted `scale` though the largest logit is `scale * groups`."""
    q, k, v = (rand(1, 2, 128, 64, seed=s).half() for s in (1, 2, 3))
    k = q.clone()        # every query's own key gives the largest possible logit
    out = ca.flash_cosine_sim_attention(q, k, v, groups=8, scale=16)
    assert torch.isfinite(out).all()
    assert_close(out, truth(q, k, v, groups=8, scale=16.0)[0], "float16")


def test_bf16_backward_computes_gradients():
    """Original: bf16 backward silently did nothing."""
    q, k, v = (rand(1, 2, 33, 32, seed=s).bfloat16().requires_grad_() for s in (1, 2, 3))
    ca.flash_cosine_sim_attention(q, k, v).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
