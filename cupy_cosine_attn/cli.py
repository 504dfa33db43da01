"""Command line: `cupy-cosine-attn {bench,info,warmup}` (also `python -m cupy_cosine_attn`).

    cupy-cosine-attn bench                  # the standard suite: GPU if there is one, else CPU
    cupy-cosine-attn bench --dtype bf16 --d 128 --n 1024,4096,16384 --causal both \\
        --mode fwd,bwd,fwdbwd --json out.json --plot out.png
    cupy-cosine-attn info                   # versions, cache dir, kernel path of each spec
    cupy-cosine-attn warmup                 # compile (and load) the common GPU kernel variants
    cupy-cosine-attn warmup --arch sm_80,sm_90a   # the same into the kernel cache, no GPU needed
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import List, Optional, Sequence

# Default suites. CPU: small enough for about half a minute on two cores. GPU: the committed
# peer anchors' shapes (b*n = 32768 tokens, 2048 / d heads), kept within two minutes on an H200.
CPU_DEFAULTS = dict(dtype=["float32"], d=[64], n=[256, 512, 1024], b=1, h=4, causal="both",
                    mode=["fwd", "fwdbwd"], repeats=5, warmup=2, budget=0.25)
GPU_DEFAULTS = dict(dtype=["bfloat16", "float16"], d=[64, 128], n=[1024, 4096, 16384],
                    tokens=32768, model_dim=2048, causal="both", mode=["fwd", "fwdbwd"],
                    repeats=10, warmup=2, budget=0.1)
WARMUP_DTYPES = ("float16", "bfloat16")
WARMUP_DIMS = (64, 128)
INFO_DIMS = (64, 128)


class UsageError(Exception):
    pass


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _pos_int(text: str) -> int:
    vals = _int_list(text)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return vals[0]


def _dtype_list(text: str) -> List[str]:
    from .bench import DTYPE_ALIASES
    out = []
    for t in text.lower().replace(" ", "").split(","):
        if t not in DTYPE_ALIASES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {t!r}; use fp16, bf16, fp32 or fp64")
        out.append(DTYPE_ALIASES[t])
    return out


def _mode_list(text: str) -> List[str]:
    from .bench import MODES
    out = [t for t in text.lower().replace(" ", "").split(",") if t]
    aliases = {"fwd+bwd": "fwdbwd", "fb": "fwdbwd", "forward": "fwd", "backward": "bwd"}
    out = [aliases.get(t, t) for t in out]
    bad = [t for t in out if t not in MODES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    return out


def _causal(text: str) -> str:
    t = text.lower()
    table = {"no": "no", "false": "no", "0": "no", "yes": "yes", "true": "yes", "1": "yes",
             "both": "both"}
    if t not in table:
        raise argparse.ArgumentTypeError("--causal takes no, yes or both")
    return table[t]


def _density(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mask density must be a number, got {text!r}")
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError("mask density must be in (0, 1]")
    return x


def _str_list(text: str) -> List[str]:
    return [t for t in text.replace(" ", "").split(",") if t]


def _arch_list(text: str) -> List[str]:
    from .kernel_build import normalize_compute_capability
    out = []
    for t in _str_list(text.lower()):
        try:
            cc = normalize_compute_capability(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"unknown arch {t!r}; use e.g. sm_80,sm_90a")
        out.append(t if t.startswith("sm_") else f"sm_{cc}")
    if not out:
        raise argparse.ArgumentTypeError("--arch needs at least one arch, e.g. sm_90a")
    return out


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    p = argparse.ArgumentParser(prog="cupy-cosine-attn",
                                description="Cosine-similarity attention: benchmark and tools.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{bench,info,warmup}")
    sub.required = True

    b = sub.add_parser("bench", help="time this package against PyTorch SDPA and references",
                       description="Benchmark side by side in one process. Defaults: a standard "
                       "suite for the device (GPU if there is one, else CPU).")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--dtype", type=_dtype_list, help="comma list of fp16,bf16,fp32,fp64")
    b.add_argument("--d", type=_int_list, help="head dims, comma list")
    b.add_argument("--n", type=_int_list, help="sequence lengths (queries = keys), comma list")
    b.add_argument("--i", type=_int_list, help="query lengths (pairs with --j)")
    b.add_argument("--j", type=_int_list, help="key lengths (pairs with --i)")
    b.add_argument("--b", type=_pos_int, help="batch (GPU default: 32768 tokens / n)")
    b.add_argument("--h", type=_pos_int, help="query heads (GPU default: 2048 / d)")
    b.add_argument("--hk", type=_pos_int, help="key/value heads (default: h); must divide h")
    b.add_argument("--causal", type=_causal, help="no, yes or both")
    b.add_argument("--mask-density", type=_density, default=None,
                   help="keep each key with this probability (key padding mask)")
    b.add_argument("--bias", action="store_true", help="add an (h, i, j) attention bias")
    b.add_argument("--groups", type=_pos_int, default=1, help="l2-norm groups (divides d)")
    b.add_argument("--scale", type=float, default=8.0)
    b.add_argument("--mode", type=_mode_list, help="comma list of fwd, bwd, fwdbwd")
    b.add_argument("--repeats", type=_pos_int, help="timed repetitions (capped by --budget)")
    b.add_argument("--warmup", type=int, help="untimed calls before timing")
    b.add_argument("--budget", type=float,
                   help="seconds of timed calls per contender, case and mode")
    b.add_argument("--contenders", type=_str_list,
                   help="subset of contenders by name (e.g. cupy-cosine-attn,sdpa,plain)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="PATH", help="write results as JSON")
    b.add_argument("--csv", metavar="PATH", help="write results as CSV")
    b.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    prog = b.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show a progress bar (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    b.add_argument("--quiet", action="store_true", help="do not print the table")

    sub.add_parser("info", help="versions, kernel cache, kernel path of each spec")
    w = sub.add_parser("warmup", help="compile the common GPU kernel variants into the disk cache",
                       description="Compile every kernel variant of the given dtypes and head "
                       "dims into the kernel cache (and load it on the GPU). With --arch no GPU "
                       "is needed: the variants a GPU of that compute capability loads are "
                       "compiled only.")
    w.add_argument("--device", default="cuda",
                   help="CUDA device to compile for and load on (default: cuda, the current one)")
    w.add_argument("--arch", type=_arch_list, default=None,
                   help="compile only, for these GPU archs (comma list, e.g. sm_80,sm_90a); "
                   "no GPU needed")
    w.add_argument("--dtypes", type=_dtype_list, default=None,
                   help="comma list of fp16,bf16,fp32 (default: fp16,bf16)")
    w.add_argument("--dims", type=_int_list, default=None,
                   help="head dims, comma list (default: 64,128)")
    return p


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------

def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if choice == "cuda" and not _cuda_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU")
    return choice


def _lengths(args, defaults) -> List[tuple]:
    """(i, j) pairs: --n gives i = j; --i/--j pair up element-wise (a single value broadcasts)."""
    if args.i or args.j:
        if args.n:
            raise UsageError("give either --n or --i/--j, not both")
        i_list = args.i or args.j
        j_list = args.j or args.i
        if len(i_list) == 1:
            i_list = i_list * len(j_list)
        if len(j_list) == 1:
            j_list = j_list * len(i_list)
        if len(i_list) != len(j_list):
            raise UsageError("--i and --j need the same number of values (or one of them a "
                             "single value)")
        return list(zip(i_list, j_list))
    return [(n, n) for n in (args.n or defaults["n"])]


def build_cases(args, device: str):
    """The cases and modes a parsed `bench` command asks for."""
    from .bench import Case
    defaults = GPU_DEFAULTS if device != "cpu" else CPU_DEFAULTS
    dtypes = args.dtype or defaults["dtype"]
    dims = args.d or defaults["d"]
    causal = args.causal or defaults["causal"]
    causals = {"no": [False], "yes": [True], "both": [False, True]}[causal]
    cases = []
    for dtype, d, (i, j), c in itertools.product(dtypes, dims, _lengths(args, defaults), causals):
        if device != "cpu" and dtype == "float64":
            raise UsageError("float64 is a CPU dtype; use --device cpu")
        if d % args.groups:
            raise UsageError(f"--groups {args.groups} must divide head dim {d}")
        if device != "cpu":
            b = args.b or max(1, defaults["tokens"] // max(i, j))
            h = args.h or max(1, defaults["model_dim"] // d)
        else:
            b = args.b or defaults["b"]
            h = args.h or defaults["h"]
        hk = args.hk or h
        if h % hk:
            raise UsageError(f"--hk {hk} must divide the number of query heads {h}")
        cases.append(Case(dtype=dtype, d=d, b=b, h=h, hk=hk, i=i, j=j, causal=c,
                          mask_density=args.mask_density, bias=bool(args.bias),
                          groups=args.groups, scale=float(args.scale)))
    return cases, (args.mode or defaults["mode"])


def cmd_bench(args) -> int:
    from . import bench
    device = resolve_device(args.device)
    defaults = GPU_DEFAULTS if device != "cpu" else CPU_DEFAULTS
    cases, modes = build_cases(args, device)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed "
                             "(pip install matplotlib)")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        doc = bench.run_suite(
            cases, modes, device,
            repeats=args.repeats or defaults["repeats"],
            warmup=defaults["warmup"] if args.warmup is None else max(0, args.warmup),
            budget_s=args.budget if args.budget is not None else defaults["budget"],
            contender_names=args.contenders, seed=args.seed, progress=progress)
    except ValueError as e:
        raise UsageError(str(e))
    if not args.quiet:
        print(bench.format_table(doc))
    if args.json:
        bench.write_json(doc, args.json)
    if args.csv:
        bench.write_csv(doc, args.csv)
    if args.plot:
        bench.plot(doc, args.plot)
    return 0


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------

def _default_kernel_path(dtype: str) -> str:
    return "sm80-fp32" if dtype == "float32" else "sm80-mma"


def kernel_path(dtype: str, d: int) -> str:
    """The GPU kernel family of a (dtype, head dim): the package's own answer when it has one."""
    for modname in ("cupy_cosine_attn.gpu", "cupy_cosine_attn.gpu_launch"):
        try:
            mod = __import__(modname, fromlist=["kernel_path"])
        except ImportError:
            continue
        fn = getattr(mod, "kernel_path", None)
        if fn is not None:
            try:
                return str(fn(dtype, d))
            except ValueError as e:
                return f"unsupported ({e})"
    return _default_kernel_path(dtype)


def _kernel_cache_line() -> str:
    from .kernel_build import CACHE_DIR_ENV, cache_stats
    st = cache_stats()
    where = "set by " + CACHE_DIR_ENV if os.environ.get(CACHE_DIR_ENV) else CACHE_DIR_ENV + " unset"
    line = (f"kernel cache    {st['dir']} ({st['entries']} entries, "
            f"{st['bytes'] / 2**20:.1f} MiB; {where})")
    if st["temp_files"]:
        line += f"; {st['temp_files']} leftover temp files"
    return line


def info_lines() -> List[str]:
    from . import bench
    device = "cuda" if _cuda_available() else "cpu"
    env = bench.environment(device)
    lines = [f"cupy-cosine-attn {env['package_version']}",
             f"python          {env['python']} ({env['platform']})",
             f"cpu             {env['cpu']} ({env['cpu_count']} logical cores)",
             f"torch           {env['torch'] or 'not installed'}"]
    try:
        import torch
        lines.append(f"torch CUDA      {torch.version.cuda or 'none (CPU build)'}")
    except ImportError:
        pass
    if device != "cpu":
        import torch
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU             {props.name}, sm_{props.major}{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)")
    else:
        lines.append("GPU             none visible to torch")
    lines += [f"driver          {env['driver'] or 'not found'}",
              f"CUDA runtime    {env['cuda_runtime'] or 'n/a'}",
              f"NVRTC           {env['nvrtc'] or 'n/a'}",
              f"CuPy            {env['cupy'] or 'not installed'}",
              _kernel_cache_line(),
              f"original pkg    {env['original_package'] or 'not installed'}",
              "", "kernel path per spec (torch CPU tensors and NumPy arrays always take cpu-tiled):"]
    lines.append(f"  {'dtype':<10}{'d':>5}  {'on CPU':<12}{'on GPU'}")
    for dtype in ("float16", "bfloat16", "float32"):
        for d in INFO_DIMS:
            lines.append(f"  {dtype:<10}{d:>5}  {'cpu-tiled':<12}{kernel_path(dtype, d)}")
    lines.append(f"  {'float64':<10}{'any':>5}  {'cpu-tiled':<12}n/a (CPU only)")
    return lines


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


# ----------------------------------------------------------------------------------------------
# warmup
# ----------------------------------------------------------------------------------------------

def warmup_specs(dtypes: Sequence[str], dims: Sequence[int]) -> list:
    """Distinct kernel specs of every (dtype, head dim), in launch-table order."""
    from .gpu_launch import kernel_specs
    seen = {}
    for dtype in dtypes:
        for d in dims:
            for spec in kernel_specs(dtype, d):
                seen.setdefault(spec, None)
    return list(seen)


def _device_index(text: str) -> Optional[int]:
    t = text.strip().lower()
    if t in ("cuda", "gpu", ""):
        return None
    t = t[len("cuda:"):] if t.startswith("cuda:") else t
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"--device: expected cuda, cuda:N or N, got {text!r}")


def warmup_jobs(specs, targets) -> list:
    """(spec, arch to compile or None when skipped, target) for every target GPU arch: what a
    GPU of that compute capability loads (sm_90 and sm_90a both mean compute capability 9.0:
    Hopper variants compile for sm_90a, the others for sm_90); Hopper variants are skipped
    elsewhere."""
    from .kernel_build import device_arch
    jobs = []
    for target in targets:
        for spec in specs:
            try:
                jobs.append((spec, device_arch(spec, target), target))
            except RuntimeError:
                jobs.append((spec, None, target))
    return jobs


def cmd_warmup(args) -> int:
    from . import kernel_build as kb
    dtypes = args.dtypes or list(WARMUP_DTYPES)
    if "float64" in dtypes:
        raise UsageError("float64 is a CPU dtype: it has no GPU kernels")
    try:
        specs = warmup_specs(dtypes, args.dims or list(WARMUP_DIMS))
    except ValueError as e:
        raise UsageError(str(e))
    device = None
    if args.arch:
        targets = list(args.arch)
    else:
        if not _cuda_available():
            print("no CUDA GPU visible and no --arch given: nothing to compile (the CPU path "
                  "needs no compilation; --arch sm_80,sm_90a fills the kernel cache without a "
                  "GPU)")
            return 0
        import cupy
        idx = _device_index(args.device)
        try:
            device = cupy.cuda.Device() if idx is None else cupy.cuda.Device(idx)
            targets = [f"sm_{device.compute_capability}"]
        except Exception as e:  # noqa: BLE001 - CUDARuntimeError: no such device
            raise UsageError(f"--device {args.device}: {e}")
    jobs = warmup_jobs(specs, targets)
    mode = (f"compile and load on GPU {device.id}" if device is not None
            else "compile only, no GPU needed")
    print(f"warmup: {len(jobs)} variants for {','.join(targets)} ({mode}); "
          f"kernel cache {kb.cache_dir()}", flush=True)
    if any(t.endswith("a") for t in targets):
        print("  (sm_90a stands for a compute capability 9.0 GPU: Hopper-only variants compile "
              "for sm_90a, the others for sm_90, as such a GPU loads them)", flush=True)
    failures = compiled = cached = skipped = 0
    unstored = False
    t_all = time.perf_counter()
    for n, (spec, arch, target) in enumerate(jobs, 1):
        prefix = f"[{n}/{len(jobs)}] {spec.name}"
        if arch is None:
            skipped += 1
            print(f"{prefix} {target} skipped (Hopper-only variant)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            built = kb.compile_cubin(spec, arch)
            unstored = unstored or built.path is None
            if built.compiled:
                compiled += 1
                status = f"{time.perf_counter() - t0:.1f} s"
            else:
                cached += 1
                status = "cached"
            if device is not None:
                with device:
                    kb.get_function(spec)
                status += ", loaded"
        except Exception as e:  # noqa: BLE001 - report every variant, then fail at the end
            failures += 1
            status = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        print(f"{prefix} {arch} {status}", flush=True)
    st = kb.cache_stats()
    print(f"done in {time.perf_counter() - t_all:.1f} s: {compiled} compiled, {cached} cached, "
          f"{skipped} skipped, {failures} failed; kernel cache {st['dir']} "
          f"({st['entries']} entries)"
          + (" -- NOT STORED: the cache directory is not writable" if unstored else ""))
    return 1 if failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"bench": cmd_bench, "info": cmd_info, "warmup": cmd_warmup}
    try:
        return handlers[args.command](args)
    except UsageError as e:
        parser.exit(2, f"cupy-cosine-attn {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
