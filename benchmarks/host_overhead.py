"""Host (CPU) time per call of the GPU forward and forward+backward, beside PyTorch SDPA: how long
Python takes to enqueue one call, against how long the GPU takes to run it. A call whose host
time exceeds its GPU time is timed by the host, in the benchmark CLI as in a training loop.

    python3 benchmarks/host_overhead.py [--profile] > host_overhead.txt

Per case: host us/call (N calls enqueued without a synchronisation, divided by N), then wall
us/call once the queue has drained (the larger of host and GPU time), for the torch op, the CuPy
array API and SDPA (cuDNN); --profile adds cProfile's top functions for the torch forward.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import cupy_cosine_attn as ca

CASES = [  # (dtype, b, h, n, d, causal)
    (torch.float16, 1, 1, 256, 64, False),
    (torch.float16, 32, 16, 1024, 128, True),
    (torch.bfloat16, 32, 32, 1024, 64, True),
    (torch.bfloat16, 32, 16, 1024, 128, False),
]


def per_call(fn, calls):
    """(host us/call, wall us/call) over `calls` calls enqueued back to back."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def stages(q, k, v, causal, calls):
    """Host us/call of the layers of one torch forward and backward, each timed on its own."""
    from cupy_cosine_attn import api, gpu_bridge, torch_ops
    from cupy_cosine_attn.problem import make_problem
    args = (q, k, v, None, None, 8.0, 1, causal, True, False)
    problem = make_problem(*args)
    out, lse = gpu_bridge.forward(problem)
    dout = torch.randn_like(q)
    steps = [
        ("make_problem", lambda: make_problem(*args)),
        ("as_cupy q (DLPack)", lambda: gpu_bridge._as_cupy(q)),
        ("torch.empty out", lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)),
        ("callers-stream enter/exit", lambda: gpu_bridge._on_callers_stream(problem).__enter__()),
        ("gpu_bridge.forward", lambda: gpu_bridge.forward(problem)),
        ("api._run_forward(make_problem)", lambda: api._run_forward(make_problem(*args))),
        ("torch op forward", lambda: torch_ops.attn_forward(*args, False)),
        ("gpu_bridge.backward", lambda: gpu_bridge.backward(problem, dout, out, lse)),
        ("torch op backward", lambda: torch_ops.attn_backward(dout, q, k, v, out, lse, None, None,
                                                             8.0, 1, causal, True, False, False)),
    ]
    for name, fn in steps:
        if name.startswith("callers"):
            def fn(problem=problem):
                with gpu_bridge._on_callers_stream(problem):
                    pass
        host, wall = per_call(fn, calls)
        print(f"  stage {name:34s} {host:9.1f} {wall:9.1f}", flush=True)


def profile(fn, calls, title, sort, rows):
    """cProfile of `calls` calls of fn, its top `rows` functions by `sort`."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"## cProfile, {calls} {title}")
    pstats.Stats(prof, stream=sys.stdout).sort_stats(sort).print_stats(rows)


def kernel_times(fn, name):
    """GPU time of each kernel of fn (CUPTI via torch.profiler; CuPy's launches included)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(f"## kernels of 5 forward+backward calls, {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="GPU time per kernel of one fwd+bwd")
    args = ap.parse_args()
    import cupy
    print(f"# torch {torch.__version__}, cupy {cupy.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'case':34s} {'what':16s} {'host us':>9s} {'wall us':>9s}")
    for dtype, b, h, n, d, causal in CASES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
        name = f"{str(dtype)[6:]} b{b} h{h} n{n} d{d}{' causal' if causal else ''}"
        qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))

        def ours():
            return ca.flash_cosine_sim_attention(q, k, v, causal=causal)

        def ours_cupy():
            return ca.flash_cosine_sim_attention(qc, kc, vc, causal=causal)

        def sdpa():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                      is_causal=causal, scale=8.0)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(q)

        def ours_fwdbwd():
            ca.flash_cosine_sim_attention(qg, kg, vg, causal=causal).backward(grad)

        if args.kernels:
            kernel_times(ours_fwdbwd, name)
        for what, fn in (("torch fwd", ours), ("cupy fwd", ours_cupy), ("sdpa-cudnn fwd", sdpa),
                         ("torch fwd+bwd", ours_fwdbwd)):
            host, wall = per_call(fn, args.calls)
            print(f"{name:34s} {what:16s} {host:9.1f} {wall:9.1f}", flush=True)
        if args.profile:
            stages(q, k, v, causal, args.calls)
            profile(ours, args.calls, f"torch forward calls, {name}", "cumulative", 45)
            profile(ours_fwdbwd, args.calls // 4, f"torch forward+backward calls, {name}", "cumulative", 45)
            profile(ours_cupy, args.calls, f"CuPy forward calls, {name}", "tottime", 30)
            args.profile = False      # the first case only


if __name__ == "__main__":
    main()
