"""CUDA runtime and driver API calls made during a benchmark CLI run (torch.profiler, CPU side):
how many times each was called and how long the host spent in it. A call that synchronises the
host with the device (cudaFree, cudaMalloc of a new segment, *Synchronize) turns a host-bound
measurement into host time + GPU time.

    python3 benchmarks/api_calls_probe.py bench --dtype bf16 --d 128 --n 1024 --causal yes --mode fwd
"""
import sys

from torch.profiler import ProfilerActivity, profile

from cupy_cosine_attn.cli import main

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    main(sys.argv[1:])
rows = [e for e in prof.key_averages() if e.key.startswith(("cuda", "cu", "Memset", "Memcpy"))]
print(f"{'API call':40s} {'calls':>8s} {'host us total':>14s} {'host us mean':>12s}")
for e in sorted(rows, key=lambda e: -e.cpu_time_total):
    print(f"{e.key[:40]:40s} {e.count:8d} {e.cpu_time_total:14.0f} {e.cpu_time_total / max(e.count, 1):12.1f}")
print(f"\n{'kernel':70s} {'calls':>8s} {'GPU us mean':>12s}")
kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith(("cuda", "cu", "Mem"))]
for e in sorted(kernels, key=lambda e: -e.device_time_total)[:16]:
    print(f"{e.key[:70]:70s} {e.count:8d} {e.device_time_total / max(e.count, 1):12.1f}")
