"""Small forward + backward calls over every kernel family, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python3 benchmarks/sanitize_check.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_check.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cupy_cosine_attn as ca  # noqa: E402


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        # the 4th to 8th span several key and query tiles (the Hopper kernels' stage rings; the
        # 6th runs the forward copy built for a bias at 128-key tiles; the 7th and 8th, without a
        # key mask, the warp-specialised d = 128 forward at both tile shapes, and refill every
        # stage of its 3-stage ring and of the d = 128 backward's more than once; the 9th the
        # d = 64 forward with three consumer warpgroups, a partial last query tile included);
        # d = 256 runs the Hopper kernels at d = 256 (the second: several query tiles per key
        # tile, both column-half warpgroups of the backward, the bias gradient); d = 24 and d = 96 with 4 groups reach the
        # normalisation passes with idle lanes and their one-warp-per-row fallback
        for d, causal, bias_kind, det, hk, i, j, groups, masked in ((64, True, "heads", False, 1, 70, 90, 1, True),
                                                            (40, False, "full", True, 2, 70, 90, 1, True),
                                                            (128, True, None, False, 2, 70, 90, 1, True),
                                                            (64, True, None, False, 2, 200, 333, 1, True),
                                                            (128, False, None, False, 1, 150, 300, 1, True),
                                                            (128, False, "full", False, 2, 150, 300, 1, True),
                                                            (128, False, None, False, 1, 450, 700, 1, False),
                                                            (128, True, None, False, 2, 200, 333, 1, False),
                                                            (64, False, None, False, 2, 450, 700, 1, False),
                                                            (256, True, None, False, 2, 150, 200, 1, True),
                                                            (256, False, "heads", False, 1, 150, 300, 1, False),
                                                            (24, False, None, False, 2, 70, 90, 1, True),
                                                            (96, True, None, False, 2, 70, 90, 4, True)):
            b, h = 2, 2
            q, k, v = (torch.randn(b, hh, n, d, device="cuda", generator=g, dtype=dt).requires_grad_()
                       for hh, n in ((h, i), (hk, j), (hk, j)))
            mask = torch.rand(b, j, device="cuda", generator=g) > 0.2
            bias = None
            if bias_kind == "heads":
                bias = torch.randn(h, i, j, device="cuda", generator=g, dtype=dt).requires_grad_()
            elif bias_kind == "full":
                bias = torch.randn(b, h, i, j, device="cuda", generator=g, dtype=dt).requires_grad_()
            out = ca.flash_cosine_sim_attention(q, k, v, mask=mask if masked else None, attn_bias=bias, causal=causal,
                                                deterministic=det, groups=groups, scale=8.0 / groups)
            out.float().sum().backward()
            torch.cuda.synchronize()
            print(dt, d, causal, bias_kind, det, groups, "ok", flush=True)


if __name__ == "__main__":
    main()
