"""Build, check and time the GPU backward on a CUDA machine.

    python benchmarks/gpu_backward_check.py [--out DIR] [--quick] [--compile-only ARCH]

1. compiles every backward kernel variant (reports registers / spills when --compile-only),
2. checks a few cases against float64 autograd,
3. times the backward alone and forward+backward (the package's GPU forward when present) for
   f16/bf16, d=64/128, n=2048..16384, causal and not, next to torch SDPA flash and cuDNN,
   printing TFLOP/s (forward flops 4*b*h*n*n*d, halved when causal; backward counted 2.5x and
   forward+backward 3.5x that) and writing JSON to DIR (default $OUT or .).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def compile_report(arch):
    from concurrent.futures import ThreadPoolExecutor

    from cupy_cosine_attn.gpu.backward import SUPPORTED_HEAD_DIMS, kernel_names
    from cupy_cosine_attn.kernel_build import KernelSpec, compile_only
    names = sorted({n for dt in ("float16", "bfloat16", "float32") for d in SUPPORTED_HEAD_DIMS
                    for n in kernel_names(dt, d).values()})

    def one(n):
        log = compile_only(KernelSpec("attn_bwd.cu", n), arch)
        regs = max(int(x) for x in re.findall(r"Used (\d+) registers", log))
        spill = max(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        return n, regs, spill

    with ThreadPoolExecutor(8) as ex:
        rows = list(ex.map(one, names))
    for n, r, s in rows:
        print(f"{arch} {n:48s} regs {r:3d} spill {s}")
    return rows


def _forward(problem):
    """(out, lse) from the package's GPU forward, or None when it is not available."""
    try:
        from cupy_cosine_attn import gpu_bridge
        return gpu_bridge.forward(problem)
    except Exception as e:  # noqa: BLE001 - the forward is another module; time what exists
        print(f"forward unavailable: {type(e).__name__}: {e}")
        return None


def _lse_out_torch(q, k, v, scale, causal):
    """fp32 lse/out from torch, a head block at a time (fallback when no GPU forward)."""
    import torch
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    qn = torch.nn.functional.normalize(q.float(), dim=-1)
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    for bi in range(b):
        for hi in range(h):
            s = scale * qn[bi, hi] @ kn[bi, hi].T
            if causal:
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1),
                                  float("-inf"))
            lse[bi, hi] = torch.logsumexp(s, -1)
            out[bi, hi] = (torch.softmax(s, -1) @ v[bi, hi].float()).to(q.dtype)
    return out, lse


def timeit(fn, warmup=2, iters=5):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def bench(args):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cupy_cosine_attn import gpu_bridge
    from cupy_cosine_attn.gpu.backward import gpu_backward
    from cupy_cosine_attn.problem import make_problem

    results = []
    ns = (2048, 4096) if args.quick else (2048, 4096, 8192, 16384)
    for dtype in ("bfloat16", "float16"):
        td = getattr(torch, dtype)
        for d in (64, 128):
            h = 2048 // d
            for n in ns:
                b = max(1, 16384 // n)
                for causal in (False, True):
                    torch.manual_seed(0)
                    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", dtype=td)
                                     for _ in range(4))
                    scale = 8.0
                    prob = make_problem(q, k, v, scale=scale, causal=causal)
                    fwd = _forward(prob)
                    have_fwd = fwd is not None
                    out, lse = fwd if have_fwd else _lse_out_torch(q, k, v, scale, causal)
                    cv = gpu_bridge._as_cupy
                    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
                    cprob = gpu_bridge._cupy_problem(prob)

                    def ours_bwd(det=False):
                        with gpu_bridge._on_callers_stream(prob):
                            gpu_backward(cprob, cv(dout), cv(out), cv(lse), cv(dq), cv(dk), cv(dv),
                                         None, deterministic=det)

                    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                    row = dict(dtype=dtype, d=d, n=n, b=b, h=h, causal=causal,
                               forward_is_ours=have_fwd)
                    row["ours_bwd_s"] = timeit(ours_bwd)
                    row["ours_bwd_det_s"] = timeit(lambda: ours_bwd(True), 1, 2)
                    if have_fwd:
                        row["ours_fwd_s"] = timeit(lambda: gpu_bridge.forward(prob))
                        row["ours_fwdbwd_s"] = row["ours_fwd_s"] + row["ours_bwd_s"]
                    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
                        try:
                            with sdpa_kernel(backend):
                                o = F.scaled_dot_product_attention(ql, kl, vl, is_causal=causal)
                                row[f"{name}_fwd_s"] = timeit(
                                    lambda: F.scaled_dot_product_attention(ql, kl, vl,
                                                                           is_causal=causal))
                                row[f"{name}_bwd_s"] = timeit(
                                    lambda: torch.autograd.grad(o, (ql, kl, vl), dout,
                                                                retain_graph=True))
                                row[f"{name}_fwdbwd_s"] = row[f"{name}_fwd_s"] + row[f"{name}_bwd_s"]
                        except Exception as e:  # noqa: BLE001 - a backend may be missing
                            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
                    for key in list(row):
                        if key.endswith("_bwd_s") or key.endswith("_det_s"):
                            row[key.replace("_s", "_tflops")] = 2.5 * flops / row[key] / 1e12
                        elif key.endswith("_fwdbwd_s"):
                            row[key.replace("_s", "_tflops")] = 3.5 * flops / row[key] / 1e12
                        elif key.endswith("_fwd_s"):
                            row[key.replace("_s", "_tflops")] = flops / row[key] / 1e12
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    del q, k, v, dout, out, lse, dq, dk, dv, fwd
                    torch.cuda.empty_cache()
    return results


def checks():
    """A few correctness cases through the test module's checker (float64 reference)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "gpu"))
    import test_gpu_backward as t
    cases = [dict(dtype="bfloat16", d=128, i=300, j=300, causal=True),
             dict(dtype="float16", d=64, i=257, j=130, mask=True, bias="heads", h=4, hk=2),
             dict(dtype="float32", d=96, i=77, j=99, bias="full"),
             dict(dtype="bfloat16", d=256, i=100, j=100, deterministic=True)]
    ok = True
    for c in cases:
        try:
            t.check_case(seed=3, **c)
            print("check ok", c)
        except AssertionError as e:
            ok = False
            print("check FAILED", c, e)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile-only", metavar="ARCH")
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        compile_report(args.compile_only)
        return
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    ok = True if args.skip_checks else checks()
    res = bench(args)
    with open(os.path.join(args.out, "gpu_backward_bench.json"), "w") as f:
        json.dump(dict(checks_ok=ok, results=res, seconds=time.time() - t0), f, indent=1)
    print("\n dtype     d     n causal | ours bwd (det) | ours f+b | flash bwd  f+b | cudnn bwd  f+b"
          "   (TFLOP/s)")
    for r in res:
        def g(k):
            x = r.get(k)
            return f"{x:6.1f}" if isinstance(x, float) and math.isfinite(x) else "     -"
        print(f" {r['dtype']:8s} {r['d']:3d} {r['n']:5d} {str(r['causal']):5s} | {g('ours_bwd_tflops')}"
              f" ({g('ours_bwd_det_tflops')}) | {g('ours_fwdbwd_tflops')} | {g('flash_bwd_tflops')}"
              f" {g('flash_fwdbwd_tflops')} | {g('cudnn_bwd_tflops')} {g('cudnn_fwdbwd_tflops')}")
    print("checks ok" if ok else "CHECKS FAILED")


if __name__ == "__main__":
    main()
