"""Throughput under sustained load: one contender's calls back to back for several seconds
(no L2 flush, no pause), so the GPU reaches the steady state of its power limit, timed over the
last seconds by CUDA events; beside the benchmark CLI's short bursts, which start from an idle
GPU at its highest clock. Run it under benchmarks/gpu_clocks.sh to see the clocks and power.

    python3 benchmarks/sustained_probe.py --dtype bf16 --d 128 --n 16384 --mode fwd
"""
from __future__ import annotations

import collections
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cupy_cosine_attn as ca
from cupy_cosine_attn.bench import MODE_FACTOR, forward_flops
from variance_probe import cell_parser, cell_shape   # this directory (run as a script)


def contenders(causal):
    def ours(q, k, v):
        return ca.flash_cosine_sim_attention(q, k, v, causal=causal)

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                  scale=8.0, is_causal=causal)
    return {"cupy-cosine-attn": ours, "sdpa-cudnn": cudnn}


def main():
    ap = cell_parser(__doc__)
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fwdbwd"])
    ap.add_argument("--seconds", type=float, default=6.0, help="load per contender")
    ap.add_argument("--measure", type=float, default=3.0, help="timed tail of that load")
    ap.add_argument("--pause", type=float, default=3.0, help="idle seconds between contenders")
    a = ap.parse_args()
    dtype, b, h = cell_shape(a)
    flops = forward_flops(b, h, a.n, a.n, a.d, a.causal) * MODE_FACTOR[a.mode]
    q, k, v = (torch.randn(b, h, a.n, a.d, device="cuda", dtype=dtype, requires_grad=a.mode == "fwdbwd")
               for _ in range(3))
    dout = torch.randn(b, h, a.n, a.d, device="cuda", dtype=dtype)
    for name, fn in contenders(a.causal).items():
        def step():
            out = fn(q, k, v)
            if a.mode == "fwdbwd":
                torch.autograd.grad(out, (q, k, v), dout)
        step()
        torch.cuda.synchronize()
        t_end = time.perf_counter() + a.seconds
        t_measure = t_end - a.measure
        marks, queue = [], collections.deque()
        while time.perf_counter() < t_end:
            step()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            queue.append(ev)
            if time.perf_counter() >= t_measure:
                marks.append(ev)
            if len(queue) > 2:        # two calls in flight: no gaps, no minutes of queued work
                queue.popleft().synchronize()
        torch.cuda.synchronize()
        ms = marks[0].elapsed_time(marks[-1]) / max(1, len(marks) - 1)
        print(f"{time.strftime('%H:%M:%S')} {name:17s} {a.dtype} d{a.d} n{a.n}{' causal' if a.causal else ''} "
              f"{a.mode}: {ms:.3f} ms per call over the last {len(marks) - 1} calls, "
              f"{flops / ms / 1e9:.0f} TFLOP/s sustained", flush=True)
        time.sleep(a.pause)


if __name__ == "__main__":
    main()
