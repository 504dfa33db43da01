"""Build, check and time the GPU forward on a CUDA machine.

    python benchmarks/gpu_forward_check.py [--out DIR] [--skip-tests] [--quick]
    python benchmarks/gpu_forward_check.py --compile-only sm_80|sm_90 [--out DIR]

1. compiles every forward variant the tests and timings use, in parallel processes (CuPy's disk
   cache then serves the test run), reporting registers / spills from NVRTC with --compile-only;
2. runs tests/gpu/test_gpu_forward.py with GPU tests required;
3. times forward (normalisation pre-pass included) for f16/bf16, d=64/128, n=2048..16384, causal
   and not, next to torch SDPA flash and cuDNN (each given F.normalize'd q, k inside its time,
   same scale), median of triton.testing.do_bench (or CUDA events), printing TFLOP/s
   (4*b*h*n*n*d, half when causal; b*n = 16k tokens, h*d = 2048) and writing JSON to DIR.
4. times tile-shape variants of the tensor-core kernel at n=8192.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

TEST_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 104, 128, 136, 160, 192, 224, 256)
VARIANTS = {   # (WARPS, MW, BN, STAGES) candidates per padded head dim, timed at n = 8192
    64: [(4, 2, 64, 3), (4, 2, 32, 3), (8, 1, 64, 3), (4, 1, 64, 3), (4, 2, 64, 2)],
    128: [(4, 2, 32, 3), (4, 2, 32, 2), (8, 1, 64, 2), (4, 1, 64, 2), (4, 2, 64, 2), (8, 1, 32, 3)],
}


def variant_list(with_variants=True):
    from cupy_cosine_attn.gpu.forward import CTYPE, kernel_name
    out = []
    for t in CTYPE:
        out += [("l2norm.cu", f"{k}<{CTYPE[t]}>") for k in ("l2norm_fwd", "l2norm_bwd",
                                                            "row_sqnorm_max", "cast_f32")]
        out += [("l2norm.cu", f"l2norm_fwd_vec<{CTYPE[t]}, {s}>") for s in (2, 4, 8, 16, 32)]
    for dtype in CTYPE:
        for d in TEST_DIMS:
            for online in (False, True):
                out.append(("attn_fwd.cu", kernel_name(dtype, d, online)))
    for dp, cfgs in (VARIANTS.items() if with_variants else ()):
        for cfg in cfgs:
            out.append(("attn_fwd.cu", kernel_name("bfloat16", dp, False, (dp,) + cfg)))
    return sorted(set(out))


def _compile_one(item):
    src, name = item
    from cupy_cosine_attn.gpu.compile import get_function
    t = time.time()
    try:
        get_function(src, name)
        return name, None, time.time() - t
    except Exception as e:  # noqa: BLE001 - reported
        return name, str(e)[-2000:], time.time() - t


def _report_one(args):
    (src, name), arch = args
    from cupy_cosine_attn.gpu.compile import compile_only, resource_usage
    try:
        log, size = compile_only(src, name, arch=arch)
    except RuntimeError as e:
        return name, None, None, str(e)[-2000:]
    regs, spill = resource_usage(log)
    return name, regs, spill, None


def warm(log, with_variants=True):
    items = variant_list(with_variants)
    t = time.time()
    bad = 0
    with ProcessPoolExecutor(min(16, os.cpu_count() or 4)) as ex:
        for name, err, dt in ex.map(_compile_one, items):
            if err:
                bad += 1
                log(f"COMPILE FAIL {name}: {err}")
    log(f"compiled {len(items)} variants in {time.time() - t:.1f}s ({bad} failed)")
    return bad


def compile_report(arch, log):
    rows = []
    with ProcessPoolExecutor(min(16, os.cpu_count() or 4)) as ex:
        for name, regs, spill, err in ex.map(_report_one, [(x, arch) for x in variant_list()]):
            rows.append(dict(arch=arch, name=name, regs=regs, spill=spill, error=err))
            log(f"{arch} {name:60s} " + (f"regs {regs:3d} spill {spill}" if err is None
                                          else f"FAILED {err}"))
    return rows


def bench_ms(fn):
    import torch
    try:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def cupy_problem(q, k, v, **kw):
    """Problem of CuPy views of torch tensors (bfloat16 as int16 raw bits)."""
    import cupy
    import torch
    from dataclasses import replace

    from cupy_cosine_attn.problem import make_problem

    def cp(t):
        return cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)
    p = make_problem(q, k, v, **kw)
    return replace(p, kind="cupy", q=cp(p.q), k=cp(p.k), v=cp(p.v))


def timings(log, quick=False):
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cupy_cosine_attn.gpu.forward import gpu_forward, launch_forward, normalize

    def cp(t):
        return cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)

    rows = []
    ns = (2048, 8192) if quick else (2048, 4096, 8192, 16384)
    for dtype in (("bfloat16",) if quick else ("bfloat16", "float16")):
        td = getattr(torch, dtype)
        for d in (64, 128):
            for n in ns:
                for causal in (False, True):
                    b, h = max(1, 16384 // n), 2048 // d
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=td) for _ in range(3))
                    scale = 8.0
                    p = cupy_problem(q, k, v, scale=scale, causal=causal)
                    out = torch.empty_like(q)
                    lse = torch.empty(b, h, n, device="cuda", dtype=torch.float32)
                    o_c, l_c = cp(out), cp(lse)
                    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

                    def ours():
                        with stream:
                            gpu_forward(p, o_c, l_c)

                    def sdpa(backend):
                        def f():
                            with sdpa_kernel(backend):
                                F.scaled_dot_product_attention(
                                    F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                    is_causal=causal, scale=scale)
                        return f

                    flops = 4 * b * h * n * n * d / (2 if causal else 1)
                    rec = dict(dtype=dtype, d=d, n=n, b=b, h=h, causal=causal)
                    for name, fn in (("ours", ours), ("flash", sdpa(SDPBackend.FLASH_ATTENTION)),
                                     ("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))):
                        try:
                            ms = bench_ms(fn)
                            rec[name] = round(flops / ms / 1e9, 1)
                        except Exception as e:  # noqa: BLE001 - a backend may be missing
                            rec[name] = None
                            log(f"{name} failed: {type(e).__name__}: {str(e)[:200]}")
                    # kernel alone (no pre-pass)
                    qh, _ = normalize(p.q, 1, True, dtype)
                    kh, _ = normalize(p.k, 1, True, dtype)
                    shift = p.scale * 1.0 - (10.0 if dtype == "float16" else 0.0)

                    def kern():
                        with stream:
                            launch_forward(p, qh, kh, p.v, o_c, l_c, shift)
                    rec["kernel_only"] = round(flops / bench_ms(kern) / 1e9, 1)
                    rows.append(rec)
                    log(json.dumps(rec))
                    del q, k, v, out, lse
    return rows


def variant_timings(log):
    import cupy
    import torch

    from cupy_cosine_attn.gpu.forward import launch_forward, normalize
    rows = []
    n = 8192
    for dp, cfgs in VARIANTS.items():
        for causal in (False, True):
            b, h = 2, 2048 // dp
            x = [torch.randn(b, h, n, dp, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            p = cupy_problem(*x, causal=causal)
            qh, _ = normalize(p.q, 1, True, "bfloat16")
            kh, _ = normalize(p.k, 1, True, "bfloat16")
            o = cupy.empty_like(p.q)
            lse = cupy.empty((b, h, n), dtype=cupy.float32)
            flops = 4 * b * h * n * n * dp / (2 if causal else 1)
            for cfg in cfgs:
                def fn():
                    launch_forward(p, qh, kh, p.v, o, lse, 8.0, cfg=(dp,) + cfg)
                ms = bench_ms(fn)
                rec = dict(d=dp, causal=causal, cfg=list(cfg), tflops=round(flops / ms / 1e9, 1))
                rows.append(rec)
                log(json.dumps(rec))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--compile-only", default=None)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--quick", action="store_true", help="bf16 and n = 2048, 8192 only")
    ap.add_argument("--pytest-args", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "gpu_forward_check.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    result = {}
    if args.compile_only:
        result["compile"] = compile_report(args.compile_only, log)
        with open(os.path.join(args.out, f"compile_{args.compile_only}.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    t0 = time.time()
    result["compile_failures"] = warm(log, not args.skip_variants)
    if not args.skip_tests:
        env = dict(os.environ, CUPY_COSINE_ATTN_REQUIRE_GPU="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "tests/gpu/test_gpu_forward.py", "--durations=5"] + args.pytest_args.split()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        with open(os.path.join(args.out, "gpu_forward_tests.txt"), "w") as f:
            f.write(r.stdout + r.stderr)
        tail = (r.stdout + r.stderr).strip().splitlines()[-40:]
        log("\n".join(tail))
        result["tests_rc"] = r.returncode
        log(f"tests rc={r.returncode} after {time.time() - t0:.0f}s")
    result["timings"] = timings(log, args.quick)
    if not args.skip_variants:
        result["variants"] = variant_timings(log)
    with open(os.path.join(args.out, "gpu_forward_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(f"\ntotal {time.time() - t0:.0f}s")
    log(f"{'dtype':9s} {'d':>4s} {'n':>6s} {'causal':>6s} {'ours':>7s} {'kernel':>7s} "
        f"{'flash':>7s} {'cudnn':>7s}   (TFLOP/s)")
    for r in result["timings"]:
        log(f"{r['dtype']:9s} {r['d']:4d} {r['n']:6d} {str(r['causal']):>6s} "
            + " ".join(f"{r.get(k) if r.get(k) is not None else '-':>7}"
                       for k in ("ours", "kernel_only", "flash", "cudnn")))
    for r in result.get("variants", []):
        log(f"variant d={r['d']} causal={r['causal']} cfg={r['cfg']} {r['tflops']} TFLOP/s")
    best = {}
    for r in result.get("variants", []):
        key = (r["d"], r["causal"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    for (d, causal), r in sorted(best.items()):
        log(f"best (WARPS, MW, BN, STAGES) for d={d} causal={causal}: {tuple(r['cfg'])} "
            f"{r['tflops']} TFLOP/s (set in forward.tc_config)")


if __name__ == "__main__":
    main()
