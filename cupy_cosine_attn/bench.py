"""Benchmark machinery behind `cupy-cosine-attn bench`: cases, contenders, timing, FLOP counts,
correctness against float64, tables, JSON/CSV and plots.

Every contender gets the raw q, k, v of a case; the l2-normalisation of q and k (and any mask
construction) happens inside its timed call, with the same scale, so the numbers compare like
with like. torch (and matplotlib for plots) are imported only when used.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

SCHEMA_NAME = "cupy-cosine-attn-bench/1"

DTYPE_ALIASES = {
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "f32": "float32", "float": "float32", "float32": "float32",
    "fp64": "float64", "f64": "float64", "double": "float64", "float64": "float64",
}
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
MODES = ("fwd", "bwd", "fwdbwd")
# Conventional FLOP multipliers: the backward does 2.5x the forward's matrix products
# (dV, dP, dQ, dK plus the recomputed QK^T), so forward+backward is 3.5x.
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}

OURS = "cupy-cosine-attn"
PLAIN = "plain"
ORIGINAL = "original"
SDPA_GPU_BACKENDS = ("flash", "efficient", "cudnn", "math")

# L2 is 50 MB on H100/H200; writing 256 MB between repetitions evicts every input of a small case.
L2_FLUSH_BYTES = 256 * 1024 * 1024
CORRECTNESS_MAX_SLICES = 4
CORRECTNESS_MAX_ROWS = 2048

# Documented JSON layout: required keys and the types their values may take. `validate_json`
# checks a document against it; tests hold the writer to it.
NoneType = type(None)
JSON_SCHEMA = {
    "document": {"schema": str, "env": dict, "settings": dict, "results": list},
    "env": {
        "package_version": str, "python": str, "platform": str, "cpu": str, "cpu_count": int,
        "torch": (str, NoneType), "cupy": (str, NoneType), "nvrtc": (str, NoneType),
        "cuda_runtime": (str, NoneType), "driver": (str, NoneType), "device": str,
        "device_name": str, "original_package": (str, NoneType), "timestamp": str,
        "timing": str, "memory": str, "correctness": str,
    },
    "settings": {"device": str, "modes": list, "repeats": int, "warmup": int,
                 "contenders": list, "scale": (int, float)},
    "result": {
        "contender": str, "dtype": str, "d": int, "b": int, "h": int, "hk": int, "i": int,
        "j": int, "causal": bool, "mask_density": (int, float, NoneType), "bias": bool,
        "groups": int, "scale": (int, float), "mode": str, "status": str,
        "reason": (str, NoneType), "time_ms": (float, NoneType),
        "first_call_ms": (float, NoneType), "repeats": int, "flops": int,
        "tflops": (float, NoneType), "peak_mem_bytes": (int, NoneType),
        "rel_err": (float, NoneType), "ratio_vs_best_other": (float, NoneType),
        "kernel_path": (str, NoneType),
    },
}
RESULT_STATUSES = ("ok", "n/a")


class NotApplicable(Exception):
    """A contender cannot run a case (dtype, head dim, mask, memory); the message says why."""


# ----------------------------------------------------------------------------------------------
# Cases and FLOP counts
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    dtype: str
    d: int
    b: int
    h: int
    hk: int
    i: int
    j: int
    causal: bool = False
    mask_density: Optional[float] = None
    bias: bool = False
    groups: int = 1
    scale: float = 8.0

    def label(self) -> str:
        parts = [SHORT_DTYPE.get(self.dtype, self.dtype), f"d{self.d}", f"b{self.b}",
                 f"h{self.h}" + (f"/{self.hk}" if self.hk != self.h else ""),
                 f"n{self.i}" if self.i == self.j else f"i{self.i}j{self.j}"]
        if self.causal:
            parts.append("causal")
        if self.mask_density is not None:
            parts.append(f"mask{self.mask_density:g}")
        if self.bias:
            parts.append("bias")
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        return " ".join(parts)

    def fields(self) -> dict:
        return dataclasses.asdict(self)


def visible_pairs(i: int, j: int, causal: bool = False, mask=None) -> int:
    """Number of visible (query row, key) pairs of one head, summed over the batch.

    Causal is bottom-right aligned: row r sees keys c <= r + (j - i). `mask` is a (b, j) bool
    array (True keeps the key); without it the count is for a batch of one.
    """
    rows = np.arange(i, dtype=np.int64)
    if causal:
        ends = np.clip(rows + 1 + (j - i), 0, j)      # keys [0, end) are visible
    else:
        ends = np.full(i, j, dtype=np.int64)
    if mask is None:
        return int(ends.sum())
    mask = np.asarray(mask, dtype=bool)
    # prefix[bi, e] = number of kept keys among the first e keys of batch bi
    prefix = np.concatenate([np.zeros((mask.shape[0], 1), np.int64),
                             np.cumsum(mask, axis=1, dtype=np.int64)], axis=1)
    return int(prefix[:, ends].sum())


def forward_flops(b: int, h: int, i: int, j: int, d: int, causal: bool = False,
                  mask=None) -> int:
    """4*d FLOPs (QK^T and PV, multiply+add each) per visible (row, key) pair, per query head."""
    pairs = visible_pairs(i, j, causal, mask)
    if mask is None:
        pairs *= b
    return 4 * d * h * pairs


def mode_flops(fwd_flops: int, mode: str) -> int:
    return int(round(fwd_flops * MODE_FACTOR[mode]))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

class Inputs:
    """One case's tensors on the benchmark device (q, k, v, optional mask and bias)."""

    def __init__(self, case: Case, device: str, seed: int = 0):
        import torch
        dt = getattr(torch, case.dtype)
        # Drawn on the device itself: large GPU cases would spend seconds in a CPU generator.
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

        self.case = case
        self.q = randn(case.b, case.h, case.i, case.d)
        self.k = randn(case.b, case.hk, case.j, case.d)
        self.v = randn(case.b, case.hk, case.j, case.d)
        self.mask = None
        if case.mask_density is not None:
            self.mask = torch.rand(case.b, case.j, generator=g, device=device) < case.mask_density
        # Bias of shape (h, i, j), broadcast over the batch (the original package's layout).
        self.bias = randn(case.h, case.i, case.j) if case.bias else None
        self.dout = randn(case.b, case.h, case.i, case.d)

    def leaves(self, requires_grad: bool):
        """Fresh leaf copies (so every contender starts from identical, grad-free inputs)."""
        ts = [self.q, self.k, self.v] + ([self.bias] if self.bias is not None else [])
        return [t.detach().clone().requires_grad_(requires_grad) for t in ts]

    def mask_numpy(self):
        return None if self.mask is None else self.mask.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------

@dataclass
class Contender:
    """`make(case, inputs, device)` returns fn(q, k, v, bias) -> out, or raises NotApplicable."""
    name: str
    make: Callable
    is_ours: bool = False


def _normalize(x, groups):
    import torch.nn.functional as F
    if groups == 1:
        return F.normalize(x, dim=-1)
    shape = x.shape
    return F.normalize(x.reshape(*shape[:-1], groups, shape[-1] // groups), dim=-1).reshape(shape)


def _make_ours(case, inputs, device):
    import cupy_cosine_attn as ca
    if device != "cpu":
        if case.dtype == "float64":
            raise NotApplicable("float64 runs on CPU only")
        try:
            from .gpu_launch import check_head_dim
            check_head_dim(case.d)
        except ImportError:
            pass
        except ValueError as e:
            raise NotApplicable(f"head dim {case.d} not supported on GPU") from e
    mask = inputs.mask

    def fn(q, k, v, bias=None):
        return ca.flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=case.scale,
                                             groups=case.groups, causal=case.causal)
    return fn


def _available_bytes(device) -> Optional[int]:
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    import torch
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def _score_matrix_bytes(case):
    # The einsum paths keep several float32 (b, h, i, j) score-sized tensors alive at once:
    # logits, masked logits, exp, probabilities, and in the backward their gradients.
    return case.b * case.h * case.i * case.j * 4 * 8


def _check_fits(case, device, what):
    need = _score_matrix_bytes(case)
    avail = _available_bytes(device)
    if avail is not None and need > 0.8 * avail:
        raise NotApplicable(f"{what} needs ~{need / 2**30:.0f} GiB of score matrices, "
                            f"{avail / 2**30:.0f} GiB free")


def _make_plain(case, inputs, device):
    import cupy_cosine_attn as ca
    _check_fits(case, device, "plain reference")
    mask = inputs.mask

    def fn(q, k, v, bias=None):
        return ca.plain_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=case.scale,
                                             groups=case.groups, causal=case.causal)
    return fn


def _sdpa_mask_args(case, inputs, device):
    """Keyword arguments expressing causal/mask/bias for SDPA (bottom-right causal alignment)."""
    import torch
    if case.bias or case.mask_density is not None:
        vis = None
        if case.causal:
            rows = torch.arange(case.i, device=device)[:, None]
            cols = torch.arange(case.j, device=device)[None, :]
            vis = (cols <= rows + (case.j - case.i))[None, None]
        if inputs.mask is not None:
            m = inputs.mask[:, None, None, :]
            vis = m if vis is None else (vis & m)
        return {"vis": vis}
    if not case.causal:
        return {}
    if case.i == case.j:
        return {"is_causal": True}
    try:
        from torch.nn.attention.bias import causal_lower_right
        return {"attn_mask": causal_lower_right(case.i, case.j)}
    except ImportError:
        rows = torch.arange(case.i, device=device)[:, None]
        cols = torch.arange(case.j, device=device)[None, :]
        return {"attn_mask": cols <= rows + (case.j - case.i)}


def _sdpa_maker(backend: Optional[str]):
    def make(case, inputs, device):
        import torch
        import torch.nn.functional as F
        if device == "cpu" and case.dtype == "float16":
            pass  # torch CPU SDPA takes float16 (slowly); let it decide
        if backend == "math" and device != "cpu":
            _check_fits(case, device, "SDPA math backend")
        kw = _sdpa_mask_args(case, inputs, device)
        vis = kw.pop("vis", None)
        gqa = {"enable_gqa": True} if case.hk != case.h else {}
        ctx = _sdpa_context(backend)
        groups, scale = case.groups, float(case.scale)

        def fn(q, k, v, bias=None):
            args = dict(kw)
            if vis is not None or bias is not None:
                # Bias and hidden keys fold into one additive float mask, built inside the timing.
                m = torch.zeros((), dtype=q.dtype, device=q.device) if bias is None else bias[None]
                if vis is not None:
                    m = m.masked_fill(~vis, float("-inf"))
                args["attn_mask"] = m
            with ctx():
                return F.scaled_dot_product_attention(_normalize(q, groups), _normalize(k, groups),
                                                      v, scale=scale, **args, **gqa)
        return fn
    return make


def _sdpa_context(backend):
    import contextlib
    if backend is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    return lambda: sdpa_kernel(which)


def _original_module():
    try:
        import flash_cosine_sim_attention as fcsa
        return fcsa
    except Exception:  # noqa: BLE001 - any import failure just means "not available"
        return None


def _make_original(case, inputs, device):
    fcsa = _original_module()
    if fcsa is None:
        raise NotApplicable("flash_cosine_sim_attention is not installed")
    if device == "cpu":
        raise NotApplicable("the original package runs on CUDA only")
    if case.hk not in (1, case.h):
        raise NotApplicable("grouped k/v heads (1 < hk < h) not supported")
    mask = inputs.mask

    def fn(q, k, v, bias=None):
        if case.hk == 1 and case.h != 1:
            k, v = k[:, 0], v[:, 0]           # its single-head k/v layout (b, j, d)
        return fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias,
                                               scale=case.scale, groups=case.groups,
                                               causal=case.causal)
    return fn


def contenders_for(device: str, include_original: Optional[bool] = None) -> List[Contender]:
    """The contenders of one device, ours first."""
    out = [Contender(OURS, _make_ours, is_ours=True)]
    if device == "cpu":
        out.append(Contender("sdpa", _sdpa_maker(None)))
    else:
        out += [Contender(f"sdpa-{b}", _sdpa_maker(b)) for b in SDPA_GPU_BACKENDS]
    out.append(Contender(PLAIN, _make_plain))
    if include_original is None:
        include_original = _original_module() is not None
    if include_original:
        out.append(Contender(ORIGINAL, _make_original))
    return out


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------

class Timer:
    """Median wall time of a callable, on CPU (perf_counter) or CUDA (events, L2 flushed)."""

    def __init__(self, device: str):
        self.device = device
        self.flush = None
        if device != "cpu":
            import torch
            self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    def sync(self):
        if self.device != "cpu":
            import torch
            torch.cuda.synchronize(self.device)

    def once_ms(self, fn) -> float:
        """One call, synchronised, in ms (used for the first call, which includes compilation)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def median_ms(self, fn, repeats: int, warmup: int, budget_s: float) -> (float, int):
        # Warm-up calls are timed one by one; their minimum (robust to a stray slow call on a
        # busy machine) caps the repetitions by a time budget so slow contenders do not
        # dominate the suite.
        est = min(self.once_ms(fn) for _ in range(max(1, warmup)))
        reps = int(max(3, min(repeats, budget_s * 1e3 / max(est, 1e-3))))
        times = []
        if self.device == "cpu":
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        else:
            import torch
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                self.flush.zero_()           # evict L2 so small cases are not timed from cache
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in events]
        return statistics.median(times), reps


MEMORY_METHOD_GPU = "torch.cuda.max_memory_allocated during one call, minus allocated before it"
MEMORY_METHOD_CPU_HWM = ("process peak RSS (VmHWM, reset through /proc/self/clear_refs) during "
                         "one call, minus RSS before it (after malloc_trim)")
MEMORY_METHOD_CPU_MAXRSS = ("growth of getrusage ru_maxrss during one call (a lower bound: only "
                            "new process-wide peaks show)")


def _read_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _read_status_kb("VmHWM")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_memory_method() -> str:
    return MEMORY_METHOD_CPU_HWM if _can_reset_hwm() else MEMORY_METHOD_CPU_MAXRSS


def peak_memory_bytes(fn, device: str) -> Optional[int]:
    """Extra memory one call needs beyond what was allocated before it."""
    if device != "cpu":
        import torch
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    if _can_reset_hwm():
        # Hand freed heap pages back to the OS first, else a call reusing them shows no growth.
        _malloc_trim()
        _can_reset_hwm()
        before = _read_status_kb("VmRSS")
        fn()
        return max(0, _read_status_kb("VmHWM") - before) * 1024
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after - before) * (1 if sys.platform == "darwin" else 1024)


# ----------------------------------------------------------------------------------------------
# Correctness against float64
# ----------------------------------------------------------------------------------------------

def _np_grouped_l2norm(x, groups):
    xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    n = np.linalg.norm(xg, axis=-1, keepdims=True)
    r = np.where(n > 1e-12, 1.0 / np.maximum(n, 1e-12), 0.0)
    return (xg * r).reshape(x.shape)


class Float64Reference:
    """float64 outputs of a few sampled (b, h) slices and query rows, straight from the math in
    docs/semantics.md (independent of the package's code paths)."""

    def __init__(self, case: Case, inputs: Inputs, seed: int = 0):
        rng = np.random.default_rng(seed)
        pairs = [(bi, hi) for bi in range(case.b) for hi in range(case.h)]
        if len(pairs) > CORRECTNESS_MAX_SLICES:
            pick = {0, len(pairs) - 1}
            while len(pick) < CORRECTNESS_MAX_SLICES:
                pick.add(int(rng.integers(len(pairs))))
            pairs = [pairs[t] for t in sorted(pick)]
        rows = np.arange(case.i)
        if case.i > CORRECTNESS_MAX_ROWS:
            rows = np.sort(rng.choice(case.i, CORRECTNESS_MAX_ROWS, replace=False))
        self.pairs, self.rows = pairs, rows
        # Only the sampled slices leave the device (whole large-case tensors would take seconds).
        as64 = lambda t: t.detach().cpu().double().numpy()
        mask = inputs.mask_numpy()
        g = case.h // case.hk
        self.out, self.visible_rows = {}, {}
        for bi, hi in pairs:
            qh = _np_grouped_l2norm(as64(inputs.q[bi, hi])[rows], case.groups)
            kh = _np_grouped_l2norm(as64(inputs.k[bi, hi // g]), case.groups)
            v = as64(inputs.v[bi, hi // g])
            s = case.scale * qh @ kh.T
            if inputs.bias is not None:
                s = s + as64(inputs.bias[hi])[rows]
            vis = np.ones((len(rows), case.j), dtype=bool)
            if case.causal:
                vis &= np.arange(case.j)[None, :] <= rows[:, None] + (case.j - case.i)
            if mask is not None:
                vis &= mask[bi][None, :]
            s = np.where(vis, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            e = np.where(vis, np.exp(s - m), 0.0)
            l = e.sum(axis=1, keepdims=True)
            p = e / np.where(l > 0, l, 1.0)
            self.out[bi, hi] = p @ v
            # Rows with no visible key are left out: conventions differ there (0 here, NaN in SDPA).
            self.visible_rows[bi, hi] = vis.any(axis=1)

    def rel_err(self, out) -> float:
        num = den = 0.0
        for bi, hi in self.pairs:
            o = out[bi, hi][self.rows].detach().cpu().double().numpy()
            keep = self.visible_rows[bi, hi]
            diff = o[keep] - self.out[bi, hi][keep]
            num += float(np.sum(diff * diff))
            den += float(np.sum(self.out[bi, hi][keep] ** 2))
        return math.sqrt(num) / max(math.sqrt(den), 1e-300)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotApplicable):
        return str(exc)
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    if "out of memory" in str(exc).lower():
        return "out of memory"
    return f"{type(exc).__name__}: {text}"[:200]


def _warning_reason(caught) -> Optional[str]:
    """torch explains in warnings why an SDPA backend refused a case. Keep the specific ones:
    skip the "... not used because:" headers and the notes that other backends were disabled
    (that is what selecting one backend does)."""
    reasons = []
    for w in caught:
        text = str(w.message).split("(Triggered internally")[0].strip()
        text = " ".join(text.split())
        low = text.lower()
        if not text or low.endswith("because:") or "runtime disabled" in low:
            continue
        if text not in reasons:
            reasons.append(text)
    return "; ".join(reasons[:2])[:200] if reasons else None


def _runner(fn, inputs: Inputs, mode: str):
    """A zero-argument callable doing one `mode` step of `fn` on `inputs`."""
    import torch
    if mode == "fwd":
        leaves = inputs.leaves(False)

        def run():
            with torch.no_grad():
                return fn(*leaves)
        return run
    leaves = inputs.leaves(True)
    dout = inputs.dout
    if mode == "fwdbwd":
        def run():
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, dout)
        return run
    out = fn(*leaves)     # bwd: one forward graph, its backward timed repeatedly

    def run():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return run


def ours_kernel_path(case, mode) -> Optional[str]:
    """Which of our GPU kernel families ran (forward, and backward for bwd modes)."""
    try:
        from .gpu_launch import backward_kernel_path, kernel_path
        fwd = "fwd " + kernel_path(case.dtype, case.d)
        if mode == "fwd":
            return fwd
        return fwd + ", bwd " + backward_kernel_path(case.dtype, case.d)
    except Exception:  # noqa: BLE001 - unsupported head dims etc. are reported elsewhere
        return None


def _result_row(case, contender, mode, flops, **kw):
    row = dict(contender=contender, **case.fields(), mode=mode, status="n/a", reason=None,
               time_ms=None, first_call_ms=None, repeats=0, flops=int(flops), tflops=None,
               peak_mem_bytes=None, rel_err=None, ratio_vs_best_other=None, kernel_path=None)
    row.update(kw)
    return row


def run_case(case: Case, modes: Sequence[str], contenders: Sequence[Contender], device: str,
             timer: Timer, repeats: int, warmup: int, budget_s: float, seed: int = 0,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    import warnings
    import torch
    inputs = Inputs(case, device, seed)
    fwd = forward_flops(case.b, case.h, case.i, case.j, case.d, case.causal, inputs.mask_numpy())
    reference = None
    rows = []
    for con in contenders:
        if progress:
            progress(con.name)
        rel_err, reject = None, None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn = con.make(case, inputs, device)
                with torch.no_grad():
                    out = fn(*inputs.leaves(False))
            if reference is None:
                reference = Float64Reference(case, inputs, seed)
            rel_err = reference.rel_err(out)
            del out
        except Exception as e:  # noqa: BLE001 - any refusal is reported, never fatal
            reject = _warning_reason(caught) if "No available kernel" in str(e) else None
            reject = reject or _reason(e)
        for mode in modes:
            flops = mode_flops(fwd, mode)
            if reject is not None:
                rows.append(_result_row(case, con.name, mode, flops, reason=reject))
                continue
            try:
                run = _runner(fn, inputs, mode)
                first = timer.once_ms(run)
                ms, reps = timer.median_ms(run, repeats, warmup, budget_s)
                mem = peak_memory_bytes(run, device)
                del run
                rows.append(_result_row(
                    case, con.name, mode, flops, status="ok", time_ms=float(ms),
                    first_call_ms=float(first), repeats=int(reps),
                    tflops=float(flops / (ms * 1e-3) / 1e12) if ms > 0 else None,
                    peak_mem_bytes=mem,
                    rel_err=float(rel_err) if rel_err is not None and math.isfinite(rel_err)
                    else None,
                    reason=None if rel_err is None or math.isfinite(rel_err)
                    else "output not finite"))
            except Exception as e:  # noqa: BLE001
                rows.append(_result_row(case, con.name, mode, flops, reason=_reason(e)))
            finally:
                if device != "cpu":
                    torch.cuda.empty_cache()
    if device != "cpu":
        for r in rows:
            if r["contender"] == OURS:
                r["kernel_path"] = ours_kernel_path(case, r["mode"])
    add_ratios(rows)
    # Table order: mode, then contender, so one case and mode read as one block.
    rows.sort(key=lambda r: MODES.index(r["mode"]))
    return rows


def add_ratios(rows: List[dict]) -> None:
    """ratio_vs_best_other on our rows: best other contender's time / ours (> 1: ours faster)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        key = tuple(r[k] for k in ("dtype", "d", "b", "h", "hk", "i", "j", "causal",
                                   "mask_density", "bias", "groups", "scale", "mode"))
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        ours = [r for r in group if r["contender"] == OURS and r["status"] == "ok"]
        others = [r["time_ms"] for r in group if r["contender"] != OURS and r["status"] == "ok"]
        for r in ours:
            r["ratio_vs_best_other"] = float(min(others) / r["time_ms"]) if others else None


def run_suite(cases: Sequence[Case], modes: Sequence[str], device: str, repeats: int,
              warmup: int, budget_s: float, contender_names: Optional[Sequence[str]] = None,
              seed: int = 0, progress: bool = False, stream=None) -> dict:
    """Run every case and return the JSON document (env, settings, results)."""
    stream = stream or sys.stderr
    contenders = contenders_for(device)
    if contender_names:
        known = {c.name for c in contenders_for(device, include_original=True)}
        unknown = [n for n in contender_names if n not in known]
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; known on {device}: {sorted(known)}")
        contenders = [c for c in contenders_for(device, include_original=True)
                      if c.name in contender_names]
    env = environment(device)
    settings = dict(device=device, modes=list(modes), repeats=int(repeats), warmup=int(warmup),
                    contenders=[c.name for c in contenders], scale=float(cases[0].scale)
                    if cases else 8.0, budget_s_per_measurement=float(budget_s), seed=int(seed))
    timer = Timer(device)
    results = []
    t0 = time.perf_counter()
    for n, case in enumerate(cases, 1):
        def show(name, n=n, case=case):
            if progress:
                bar_len = 20
                done = int(bar_len * (n - 1) / len(cases))
                line = (f"\r[{'#' * done}{'.' * (bar_len - done)}] {n}/{len(cases)} "
                        f"{case.label()}: {name}  ({time.perf_counter() - t0:.0f} s)")
                stream.write(line.ljust(100)[:120])
                stream.flush()
        results += run_case(case, modes, contenders, device, timer, repeats, warmup, budget_s,
                            seed, show)
    if progress:
        stream.write("\r" + " " * 120 + "\r")
        stream.flush()
    env["suite_seconds"] = round(time.perf_counter() - t0, 2)
    return {"schema": SCHEMA_NAME, "env": env, "settings": settings, "results": results}


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _try(fn):
    try:
        v = fn()
        return None if v is None else str(v)
    except Exception:  # noqa: BLE001 - missing pieces are reported as None
        return None


def _cuda_version(v: Optional[str]) -> Optional[str]:
    # CUDA encodes versions as 1000*major + 10*minor.
    if v is None or not v.isdigit():
        return v
    n = int(v)
    return f"{n // 1000}.{(n % 1000) // 10}"


def _driver_version() -> Optional[str]:
    import shutil
    import subprocess
    if shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def cache_dir() -> str:
    return os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy",
                                                             "kernel_cache")


def environment(device: str) -> dict:
    from ._version import __version__
    torch_v = _try(lambda: __import__("torch").__version__)
    cupy_v = _try(lambda: __import__("cupy").__version__)

    def nvrtc():
        from cupy.cuda import nvrtc as nv
        return ".".join(map(str, nv.getVersion()))

    def runtime():
        from cupy.cuda import runtime as rt
        return _cuda_version(str(rt.runtimeGetVersion()))

    def driver():
        v = _driver_version()
        if v:
            return v
        from cupy.cuda import runtime as rt
        v = rt.driverGetVersion()
        return f"CUDA {_cuda_version(str(v))}" if v else None

    device_name = _cpu_name()
    if device != "cpu":
        device_name = _try(lambda: __import__("torch").cuda.get_device_name(device)) or device
    orig = _original_module()
    if device == "cpu":
        timing = "median of time.perf_counter over repetitions after warm-up"
        memory = cpu_memory_method()
    else:
        timing = ("median of CUDA-event timings after warm-up; a 256 MB write between "
                  "repetitions flushes L2")
        memory = MEMORY_METHOD_GPU
    return {
        "package_version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch": torch_v,
        "torch_threads": _try(lambda: __import__("torch").get_num_threads()),
        "cupy": cupy_v,
        "nvrtc": _try(nvrtc) if cupy_v else None,
        "cuda_runtime": _try(runtime) if cupy_v else None,
        "driver": (_try(driver) if cupy_v else _driver_version()),
        "device": device,
        "device_name": device_name,
        "original_package": None if orig is None else str(getattr(orig, "__version__",
                                                                   "installed")),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing": timing,
        "memory": memory,
        "correctness": (f"relative l2 error of the forward output against a float64 evaluation "
                        f"of the same inputs, over at most {CORRECTNESS_MAX_SLICES} (b, h) "
                        f"slices and {CORRECTNESS_MAX_ROWS} query rows; rows without a "
                        f"visible key are left out"),
        "flops": "forward 4*d*h per visible (row, key) pair; backward 2.5x, fwd+bwd 3.5x",
    }


# ----------------------------------------------------------------------------------------------
# Validation and output
# ----------------------------------------------------------------------------------------------

def _check_keys(obj, spec, where) -> List[str]:
    problems = []
    if not isinstance(obj, dict):
        return [f"{where}: expected an object"]
    for key, types in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
            continue
        types = types if isinstance(types, tuple) else (types,)
        val = obj[key]
        # bool is an int subclass; only accept it where bool is meant
        if isinstance(val, bool) and bool not in types:
            problems.append(f"{where}.{key}: bool not allowed")
        elif not isinstance(val, types):
            problems.append(f"{where}.{key}: {type(val).__name__} not in "
                            f"{[t.__name__ for t in types]}")
    return problems


def validate_json(doc) -> List[str]:
    """Problems of a document against JSON_SCHEMA (empty list: valid)."""
    problems = _check_keys(doc, JSON_SCHEMA["document"], "document")
    if problems:
        return problems
    if doc["schema"] != SCHEMA_NAME:
        problems.append(f"document.schema: {doc['schema']!r} != {SCHEMA_NAME!r}")
    problems += _check_keys(doc["env"], JSON_SCHEMA["env"], "env")
    problems += _check_keys(doc["settings"], JSON_SCHEMA["settings"], "settings")
    for n, r in enumerate(doc["results"]):
        where = f"results[{n}]"
        problems += _check_keys(r, JSON_SCHEMA["result"], where)
        if isinstance(r, dict):
            if r.get("status") not in RESULT_STATUSES:
                problems.append(f"{where}.status: {r.get('status')!r}")
            if r.get("mode") not in MODES:
                problems.append(f"{where}.mode: {r.get('mode')!r}")
            if r.get("status") == "ok" and r.get("time_ms") is None:
                problems.append(f"{where}: ok without time_ms")
            if r.get("status") == "n/a" and not r.get("reason"):
                problems.append(f"{where}: n/a without reason")
    return problems


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


CSV_COLUMNS = list(JSON_SCHEMA["result"])


def write_csv(doc: dict, path: str) -> None:
    """Results as CSV, preceded by the environment as `# key: value` comment lines."""
    with open(path, "w", newline="") as f:
        for k, v in doc["env"].items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def env_header(env: dict) -> str:
    keys = [("package", "package_version"), ("device", "device"), ("name", "device_name"),
            ("python", "python"), ("torch", "torch"), ("cupy", "cupy"), ("nvrtc", "nvrtc"),
            ("cuda", "cuda_runtime"), ("driver", "driver"), ("original", "original_package")]
    parts = [f"{label} {env.get(key)}" for label, key in keys if env.get(key) is not None]
    lines = ["# " + ", ".join(parts),
             f"# timing: {env.get('timing')}", f"# memory: {env.get('memory')}",
             f"# correctness: {env.get('correctness')}", f"# {env.get('flops')}"]
    if "suite_seconds" in env:
        lines.append(f"# suite wall time: {env['suite_seconds']} s")
    return "\n".join(lines)


def _fmt_mem(b):
    if b is None:
        return "-"
    return f"{b / 2**20:.1f}"


def format_table(doc: dict) -> str:
    """The terminal table: one block per case and mode, one line per contender."""
    head = ("case", "mode", "contender", "ms", "TFLOP/s", "peak MiB", "rel err", "vs best",
            "first ms", "note")
    lines = []
    for r in doc["results"]:
        case = Case(**{f.name: r[f.name] for f in dataclasses.fields(Case)})
        if r["status"] == "ok":
            cells = (case.label(), r["mode"], r["contender"], f"{r['time_ms']:.3f}",
                     f"{r['tflops']:.3g}" if r["tflops"] is not None else "-",
                     _fmt_mem(r["peak_mem_bytes"]),
                     f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-",
                     f"{r['ratio_vs_best_other']:.2f}x"
                     if r["ratio_vs_best_other"] is not None else "",
                     f"{r['first_call_ms']:.1f}", r["reason"] or r.get("kernel_path") or "")
        else:
            cells = (case.label(), r["mode"], r["contender"], "n/a", "", "", "", "", "",
                     f"n/a: {r['reason']}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else \
        [len(h) for h in head]
    out = [env_header(doc["env"]), ""]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out.append(fmt(head))
    out.append(fmt(["-" * w for w in widths]))
    prev = None
    for cells in lines:
        if prev is not None and cells[:2] != prev:
            out.append("")
        out.append(fmt(cells))
        prev = cells[:2]
    return "\n".join(out)


def plot(doc: dict, path: str) -> None:
    """TFLOP/s against sequence length, one line per contender, one panel per
    (dtype, head dim, causal, mode)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    panels: Dict[tuple, Dict[str, list]] = {}
    for r in doc["results"]:
        if r["status"] != "ok" or r["tflops"] is None:
            continue
        key = (r["dtype"], r["d"], r["causal"], r["mode"])
        panels.setdefault(key, {}).setdefault(r["contender"], []).append((r["j"], r["tflops"]))
    if not panels:
        raise RuntimeError("nothing to plot: no contender produced a timing")
    keys = sorted(panels, key=lambda k: (k[0], k[1], k[2], MODES.index(k[3])))
    # One colour per contender across all panels.
    names = sorted({name for p in panels.values() for name in p})
    colours = {name: f"C{n % 10}" for n, name in enumerate(names)}
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[name],
                    linewidth=2.5 if name == OURS else 1.2, label=name)
        dtype, d, causal, mode = key
        ax.set_title(f"{SHORT_DTYPE.get(dtype, dtype)} d={d} {'causal' if causal else 'dense'} "
                     f"{mode}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (keys)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    env = doc["env"]
    fig.suptitle(f"cupy-cosine-attn {env.get('package_version')} on {env.get('device_name')} "
                 f"(torch {env.get('torch')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
