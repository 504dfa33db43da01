"""GPU speed, side by side in one process: this package vs PyTorch SDPA backends.

Same problem as the committed peer anchors: cosine-sim attention, scale 8, b*n = 32768 tokens,
heads = 2048 / d; every contender gets raw q, k, v and its l2-normalisation is inside its time.
Median of CUDA-event timings (triton's do_bench when importable). TFLOP/s: 4*b*h*n*n*d forward
(half when causal), fwd+bwd 3.5x that.

    python benchmarks/gpu_speed.py [--dtype bf16,fp16] [--d 64,128] [--n 2048,...] [--mode fwd,fwdbwd]
        [--json out.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cupy_cosine_attn as ca  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def bench_ms(fn):
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=50, rep=200, return_mode="median")
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(10):
            fn()
        times = []
        for _ in range(30):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def contender(name, causal):
    if name == "ours":
        return lambda q, k, v: ca.flash_cosine_sim_attention(q, k, v, causal=causal)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPA[name]):
            return F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                  is_causal=causal, scale=8.0)
    return sdpa


def run(dtype, d, n, causal, mode, names):
    b, h = max(1, 32768 // n), 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=DT[dtype]) for _ in range(3))
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0) * (3.5 if mode == "fwdbwd" else 1.0)
    row = {"dtype": dtype, "d": d, "n": n, "b": b, "h": h, "causal": causal, "mode": mode}
    for name in names:
        fn = contender(name, causal)
        try:
            if mode == "fwd":
                with torch.no_grad():
                    ms = bench_ms(lambda: fn(q, k, v))
            else:
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                dout = torch.randn_like(q)

                def step():
                    fn(qq, kk, vv).backward(dout)
                ms = bench_ms(step)
            row[name] = round(flops / ms / 1e9, 1)
        except Exception as e:  # a backend that rejects the case
            row[name] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16,fp16")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--n", default="1024,2048,4096,8192,16384")
    ap.add_argument("--causal", default="no,yes")
    ap.add_argument("--mode", default="fwd")
    ap.add_argument("--contenders", default="ours,sdpa-flash,sdpa-cudnn")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    names = a.contenders.split(",")
    rows = []
    print("dtype d n causal mode " + " ".join(names) + "  (TFLOP/s)")
    for mode in a.mode.split(","):
        for dtype in a.dtype.split(","):
            for d in map(int, a.d.split(",")):
                for causal in (c == "yes" for c in a.causal.split(",")):
                    for n in map(int, a.n.split(",")):
                        r = run(dtype, d, n, causal, mode, names)
                        rows.append(r)
                        print(dtype, d, n, "yes" if causal else "no", mode,
                              " ".join(str(r[x]) for x in names), flush=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
