"""One forward + backward of the package on the GPU, for a profiler (ncu, nsys) to look at.

    ncu --kernel-name regex:attn_bwd_wgmma --launch-skip 1 --launch-count 1 \\
        python benchmarks/profile_step.py --d 64 --n 16384

Runs the step twice (the first call compiles and loads the kernels), then synchronises.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cupy_cosine_attn import flash_cosine_sim_attention  # noqa: E402


def step_parser(n_default):
    """--d, --n, --causal, --dtype: one step of the benchmark CLI's problem (32768 tokens, 2048/d heads)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, default=n_default)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    return ap


def step_inputs(a):
    """q, k, v (leaves needing gradients) and an output gradient for parsed arguments `a`."""
    b, h = max(1, 32768 // a.n), 2048 // a.d
    dt = getattr(torch, a.dtype)
    q, k, v = (torch.randn(b, h, a.n, a.d, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(b, h, a.n, a.d, device="cuda", dtype=dt)


def main():
    a = step_parser(16384).parse_args()
    q, k, v, go = step_inputs(a)
    for _ in range(2):
        flash_cosine_sim_attention(q, k, v, causal=a.causal).backward(go)
    torch.cuda.synchronize()
    print("done", tuple(q.shape), a.dtype, "causal" if a.causal else "non-causal")


if __name__ == "__main__":
    main()
