"""NVRTC compile time per kernel variant, cold, into an empty temporary kernel cache.

    python benchmarks/compile_times.py                  # sm_80,sm_90a x fp16,bf16 x d 64,128
    python benchmarks/compile_times.py --arch sm_90a --dtypes bf16 --dims 128 --repeats 5
    python benchmarks/compile_times.py --out benchmarks/results/compile_times_cpu

Needs CuPy and NVRTC, no GPU: it runs the same on a CPU-only machine and on a GPU machine (the
work is NVRTC and ptxas on the host CPU either way). Variants: every spec of
gpu_launch.kernel_specs(dtype, d), deduplicated; Hopper-only specs compile for sm_90a only. Each
variant and arch is compiled `--repeats` times, each time into a fresh empty cache directory
(cold: NVRTC runs, the entry is written), then read back once from the cache (warm hit: read and
checksum). Registers and spill bytes come from ptxas's report in the NVRTC log.

Writes <out>.json and <out>.md (default out: benchmarks/results/compile_times_cpu without a
visible GPU, compile_times_gpu with one).
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cupy_cosine_attn import kernel_build as kb  # noqa: E402
from cupy_cosine_attn._version import __version__  # noqa: E402

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32",
          "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name():
    try:
        from cupy.cuda import runtime
        if runtime.getDeviceCount() < 1:
            return None
        name = runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _environment():
    import cupy
    return {"package_version": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "gpu": _gpu_name() or "none visible", "cupy": cupy.__version__,
            "nvrtc": ".".join(map(str, kb._nvrtc_version())),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _specs(dtypes, dims):
    from cupy_cosine_attn.cli import warmup_specs
    return warmup_specs(dtypes, dims)


def _ptxas(log, lowered):
    """(registers, spill store bytes) of the `lowered` function from ptxas's -v report."""
    text = log
    i = log.find(f"Function properties for {lowered}")
    if i >= 0:
        text = log[i:]
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def measure(spec, arch, repeats):
    cold = []
    with tempfile.TemporaryDirectory(prefix="cca-compile-times-") as tmp:
        for r in range(repeats):
            os.environ[kb.CACHE_DIR_ENV] = os.path.join(tmp, f"cold{r}")
            t0 = time.perf_counter()
            built = kb.compile_cubin(spec, arch)
            cold.append(time.perf_counter() - t0)
            assert built.compiled and built.path is not None, "cache entry was not written"
        t0 = time.perf_counter()
        hit = kb.compile_cubin(spec, arch)
        warm = time.perf_counter() - t0
        assert not hit.compiled
    regs, spill = _ptxas(built.log, built.lowered_name)
    return {"source": spec.source, "name": spec.name, "hopper": spec.is_hopper,
            "arch": built.arch, "cold_s": round(statistics.median(cold), 4),
            "cold_s_min": round(min(cold), 4), "cold_s_all": [round(c, 4) for c in cold],
            "warm_hit_ms": round(warm * 1e3, 3),
            "registers": regs, "spill_store_bytes": spill, "cubin_bytes": len(built.cubin)}


def to_markdown(doc):
    env, st = doc["environment"], doc["settings"]
    out = [f"# NVRTC compile time per kernel variant (cupy-cosine-attn {env['package_version']})",
           "",
           f"Machine: {env['cpu']}, {env['cpu_count']} logical cores; GPU: {env['gpu']}. "
           f"NVRTC {env['nvrtc']}, CuPy {env['cupy']}, Python {env['python']}, "
           f"{env['timestamp']}.",
           "",
           f"Cold = compile into an empty kernel cache (NVRTC + ptxas + writing the entry), median "
           f"of {st['repeats']}; warm = the same call answered from the cache (read + sha256 "
           f"check). Variants: kernel_specs over dtypes {', '.join(st['dtypes'])} and head dims "
           f"{', '.join(map(str, st['dims']))} (each distinct spec once), archs "
           f"{', '.join(st['archs'])}. Made by `python benchmarks/compile_times.py`.",
           ""]
    if doc.get("note"):
        out += [doc["note"], ""]
    out += ["| arch | variants | cold total (s) | cold mean (s) | slowest (s) |",
            "|---|---|---|---|---|"]
    for arch, t in doc["totals"].items():
        out.append(f"| {arch} | {t['variants']} | {t['cold_s']:.2f} | {t['mean_s']:.2f} | "
                   f"{t['max_s']:.2f} |")
    out += ["", "| variant | source | arch | cold (s) | warm hit (ms) | regs | spill B | cubin KiB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        out.append(f"| `{r['name']}` | {r['source']} | {r['arch']} | {r['cold_s']:.2f} | "
                   f"{r['warm_hit_ms']:.1f} | {r['registers']} | {r['spill_store_bytes']} | "
                   f"{r['cubin_bytes'] / 1024:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90a", help="comma list of target archs")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16,bf16,fp32")
    ap.add_argument("--dims", default="64,128", help="comma list of head dims")
    ap.add_argument("--repeats", type=int, default=3, help="cold compiles per variant")
    ap.add_argument("--out", default=None, help="output path without suffix")
    ap.add_argument("--note", default=None, help="a line of context for the markdown file")
    args = ap.parse_args(argv)

    archs = [a for a in args.arch.replace(" ", "").split(",") if a]
    for a in archs:
        kb._check_arch(a)
    dtypes = [DTYPES[t] for t in args.dtypes.replace(" ", "").lower().split(",") if t]
    dims = [int(t) for t in args.dims.replace(" ", "").split(",") if t]
    specs = _specs(dtypes, dims)
    env = _environment()
    out = args.out or str(ROOT / "benchmarks" / "results" /
                          ("compile_times_cpu" if env["gpu"] == "none visible"
                           else "compile_times_gpu"))
    saved_env = os.environ.get(kb.CACHE_DIR_ENV)
    jobs = [(s, a) for a in archs for s in specs if not s.is_hopper or a == "sm_90a"]
    results = []
    t_all = time.perf_counter()
    try:
        for n, (spec, arch) in enumerate(jobs, 1):
            r = measure(spec, arch, max(1, args.repeats))
            results.append(r)
            print(f"[{n}/{len(jobs)}] {spec.name} {r['arch']} {r['cold_s']:.2f} s "
                  f"(regs {r['registers']}, spill {r['spill_store_bytes']} B)", flush=True)
    finally:
        if saved_env is None:
            os.environ.pop(kb.CACHE_DIR_ENV, None)
        else:
            os.environ[kb.CACHE_DIR_ENV] = saved_env
    totals = {}
    for arch in archs:
        rows = [r for r in results if r["arch"] == arch]
        if rows:
            times = [r["cold_s"] for r in rows]
            totals[arch] = {"variants": len(rows), "cold_s": round(sum(times), 3),
                            "mean_s": round(sum(times) / len(times), 4), "max_s": max(times)}
    doc = {"environment": env,
           "settings": {"archs": archs, "dtypes": dtypes, "dims": dims,
                        "repeats": max(1, args.repeats)},
           "note": args.note, "totals": totals, "results": results,
           "wall_s": round(time.perf_counter() - t_all, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    Path(out + ".md").write_text(to_markdown(doc))
    print(f"wrote {out}.json and {out}.md ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
