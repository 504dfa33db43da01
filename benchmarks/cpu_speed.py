"""CPU speed and peak memory: tiled path vs the plain einsum reference vs torch's CPU SDPA.

Every contender gets the same raw q, k, v (float32, b=1, h=4, d=64, scale 8); SDPA's time includes
the l2-normalisation of q and k. Each (contender, n, mode) runs in a fresh subprocess so its peak
resident memory (ru_maxrss minus the process's baseline after making the inputs) is its own.

    python benchmarks/cpu_speed.py [--n 1024,2048,4096,8192] [--out benchmarks/results/cpu_speed]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONTENDERS = ("tiled", "sdpa", "plain")


def _measure(contender, n, mode, causal, reps):
    import torch
    import torch.nn.functional as F

    import cupy_cosine_attn as ca

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    if mode == "fwdbwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def run():
        if contender == "tiled":
            out = ca.flash_cosine_sim_attention(q, k, v, causal=causal)
        elif contender == "plain":
            out = ca.plain_cosine_sim_attention(q, k, v, causal=causal)
        else:
            out = F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1),
                                                 v, is_causal=causal, scale=8.0)
        if mode == "fwdbwd":
            out.sum().backward()
        return out

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.set_grad_enabled(mode == "fwdbwd"):
        run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mib": peak / 1024.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1024,2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child process mode
    args = ap.parse_args(argv)
    if args.one:
        contender, n, mode, causal = args.one.split(":")
        print(json.dumps(_measure(contender, int(n), mode, causal == "1", args.reps)))
        return 0

    rows = []
    for n in (int(x) for x in args.n.split(",")):
        for mode in ("fwd", "fwdbwd"):
            for causal in (False, True):
                row = {"n": n, "mode": mode, "causal": causal}
                for c in CONTENDERS:
                    reps = 1 if (c == "plain" and n >= 8192) else args.reps
                    cmd = [sys.executable, __file__, "--one", f"{c}:{n}:{mode}:{int(causal)}",
                           "--reps", str(reps)]
                    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    row[c] = json.loads(res.stdout.strip().splitlines()[-1])
                row["vs_plain"] = row["plain"]["seconds"] / row["tiled"]["seconds"]
                row["vs_sdpa"] = row["sdpa"]["seconds"] / row["tiled"]["seconds"]
                rows.append(row)
                print(_line(row), flush=True)
    env = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": __import__("torch").__version__}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"CPU: {env}\n\n| n | mode | causal | tiled s | sdpa s | plain s | "
                    "x plain | x sdpa | tiled MiB | sdpa MiB | plain MiB |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write("| " + " | ".join(_cells(r)) + " |\n")
    return 0


def _cells(r):
    return [str(r["n"]), r["mode"], "yes" if r["causal"] else "no",
            *(f"{r[c]['seconds']:.4f}" for c in CONTENDERS),
            f"{r['vs_plain']:.2f}", f"{r['vs_sdpa']:.2f}",
            *(f"{r[c]['peak_mib']:.0f}" for c in CONTENDERS)]


def _line(r):
    return "  ".join(_cells(r))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
