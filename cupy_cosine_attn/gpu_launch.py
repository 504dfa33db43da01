"""Launchers for the GPU kernels: turn a canonical Problem of CuPy arrays into kernel launches.

Arrays may be raw-bit views (bfloat16 as int16): every launch takes its element type from
`problem.dtype`, never from the arrays. Everything runs on CuPy's current stream and device,
which the caller (gpu_bridge) points at the framework's stream and the arrays' device.

Temporaries (normalised q/k, norms, contiguous copies, fp32 gradient accumulators) come from the
current *workspace* (`workspace()`, set with `using_workspace`), never from `cupy.empty` directly:
CuPy's memory pool by default, torch's caching allocator for torch callers (gpu_bridge). Under
CUDA-graph capture torch serves those from the graph's private pool, so replays find valid memory.

Stream capture: nothing here synchronises with the host while the current stream is being
captured. The fixed softmax shift needs the logit range, which with a bias (or l2norm_qk=False)
is read back from the device; during capture the online-softmax kernel runs instead, which is
exact for any logit range and so also right for whatever values a replay brings. Kernels are
compiled and loaded by the first call, which must therefore happen before capture on drivers
older than CUDA 12.3 (a first load inside a capture that fails raises an error saying so).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os

import numpy as np

from .kernel_build import KernelCompileError, KernelSpec, get_function
from .problem import logit_bound, softmax_shift

CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 8))
MMA_BN = 64          # keys per tile of the mma kernels


def fwd_warps(dp):
    """Warps per CTA of the mma forward (16 query rows each); env override for tuning runs."""
    env = os.environ.get("CUPY_COSINE_ATTN_FWD_WARPS")
    if env:
        return int(env)
    return 4
SIMT_ROWS = 4        # query rows per CTA of the fp32 kernels (one warp each)
WARPS_PER_ROW_BLOCK = 8


def check_head_dim(d):
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d={d} is not supported on the GPU; supported: multiples of 8 "
                         f"from 16 to 256 ({', '.join(map(str, SUPPORTED_HEAD_DIMS))})")


def padded_dim(dtype, d):
    """Head dim the kernel template is instantiated for: 16s for mma tiles, 32s for fp32 lanes."""
    step = 32 if dtype == "float32" else 16
    return -(-d // step) * step


def kernel_path(dtype, d):
    """Which kernel family a (dtype, head dim) forward runs on, on the current device (the
    Hopper kernel takes every call with a fixed softmax shift; wide logit ranges stay on sm80)."""
    check_head_dim(d)
    if dtype == "float32":
        return "sm80-simt-fp32"
    from . import hopper_launch
    try:
        if hopper_launch.covers(dtype, d, online=False):
            return "sm90-wgmma"
    except Exception:       # no usable GPU: report the portable path
        pass
    return "sm80-mma"


def backward_kernel_path(dtype, d, deterministic=False):
    """Which kernel family computes the gradients of a (dtype, head dim) call on this device."""
    check_head_dim(d)
    if dtype == "float32":
        return "sm80-simt-fp32"
    from . import hopper_launch
    try:
        if hopper_launch.covers_backward(dtype, d, deterministic):
            return "sm90-wgmma"
    except Exception:       # no usable GPU: report the portable path
        pass
    return "sm80-mma"


def _cp():
    import cupy
    return cupy


def _i32(x):
    return np.int32(x)


def _rows_grid(rows):
    return (max(1, -(-rows // WARPS_PER_ROW_BLOCK)),), (32 * WARPS_PER_ROW_BLOCK,)


V8_BLOCK = 256


def row_v8_layout(d, groups):
    """(threads per row, threads per summed group) of prep.cu's *_v8 row kernels (8 elements per
    thread), or None where they do not apply: a group must be 8·2^k elements wide so that its sum
    is a butterfly over aligned lanes."""
    if d % 8 or not 8 <= d <= 256:
        return None
    tpr = 1 << (d // 8 - 1).bit_length()
    if groups == 1:
        return tpr, tpr
    per = d // groups // 8
    if d % groups or (d // groups) % 8 or per & (per - 1):
        return None
    return tpr, per


def _v8_launch(name, dtype, rows, tpr, arrays, tail):
    """Launch prep.cu's `name`_v8 over `rows` rows if every array is 16-byte aligned; False if not."""
    if any(a.data.ptr % 16 for a in arrays):
        return False
    grid = (-(-rows // (V8_BLOCK // tpr)),)
    _launch(KernelSpec("prep.cu", f"{name}_v8<{CTYPE[dtype]}>"), grid, (V8_BLOCK,), tuple(arrays) + tail)
    return True


# ---------------------------------------------------------------------------------------------
# Workspace: where temporaries come from, and whether the current stream is being captured
# ---------------------------------------------------------------------------------------------

def stream_is_capturing(stream):
    """True while `stream` (a cupy.cuda.Stream) is capturing into a CUDA graph.

    A query that itself fails counts as capturing: CUDA refuses it (cudaErrorStreamCaptureImplicit)
    when the legacy default stream is asked while another stream captures, and then no host
    synchronisation may happen either.
    """
    try:
        query = getattr(stream, "is_capturing", None)
        if query is not None:
            return bool(query())
        from cupy.cuda import runtime
        return bool(runtime.streamIsCapturing(stream.ptr))
    except Exception:  # noqa: BLE001 - CUDARuntimeError; see the docstring
        return True


class Workspace:
    """Allocator of a call's temporaries (C-contiguous CuPy arrays on the current device).

    Subclasses give `empty` and `capturing`; temporaries are only ever used on the current stream,
    so an allocator that is stream-ordered on that stream may reuse them as soon as they die.
    """

    def empty(self, shape, dtype):
        raise NotImplementedError

    def zeros(self, shape, dtype):
        x = self.empty(shape, dtype)
        x.fill(0)             # cudaMemsetAsync on the current stream: fine inside a capture
        return x

    def capturing(self):
        """True while the current stream is being captured into a CUDA graph."""
        raise NotImplementedError


class CupyWorkspace(Workspace):
    """CuPy's memory pool (the default, for CuPy callers).

    `keep`, a list, receives every temporary: a CuPy caller capturing a CUDA graph itself holds
    that list as long as the graph, since CuPy's pool would otherwise hand the memory of the
    captured temporaries to later arrays once the call returns.
    """

    def __init__(self, keep=None):
        self.keep = keep

    def empty(self, shape, dtype):
        x = _cp().empty(shape, dtype=dtype)
        if self.keep is not None:
            self.keep.append(x)
        return x

    def capturing(self):
        return stream_is_capturing(_cp().cuda.get_current_stream())


_WORKSPACE = contextvars.ContextVar("cupy_cosine_attn_workspace", default=CupyWorkspace())


def workspace() -> Workspace:
    """The workspace of the current call (CuPy's pool unless `using_workspace` set another)."""
    return _WORKSPACE.get()


@contextlib.contextmanager
def using_workspace(ws: Workspace):
    """Take every temporary of the calls inside the block from `ws` (per thread / context)."""
    token = _WORKSPACE.set(ws)
    try:
        yield ws
    finally:
        _WORKSPACE.reset(token)


# ---------------------------------------------------------------------------------------------
# Launching (first use of a kernel inside a capture: a clear error instead of a bare CUDA one)
# ---------------------------------------------------------------------------------------------

_READY = set()       # (device, key) of every kernel that has been used once in this process

_CAPTURE_LOAD_HINT = (
    "cupy_cosine_attn: {what} was used for the first time inside a CUDA graph capture and "
    "failed there ({err}). Kernels are compiled and loaded on first use, which inside a capture "
    "needs a CUDA 12.3 or newer driver: call the op once with the same dtype, head dim and "
    "options before capturing (torch's usual warm-up on a side stream does this; "
    "`cupy-cosine-attn warmup` compiles the common variants).")


def _first_use(what, key, call):
    """call(), remembering `key` once it worked on this device: when a first use fails inside a
    stream capture, raise an error that says why and what to do."""
    full_key = (_cp().cuda.runtime.getDevice(), key)
    if full_key in _READY:
        return call()
    capturing = workspace().capturing()
    try:
        result = call()
    except KernelCompileError:
        raise
    except Exception as e:  # noqa: BLE001 - CUDA driver/runtime errors of module loading
        if not capturing:
            raise
        raise RuntimeError(_CAPTURE_LOAD_HINT.format(
            what=what, err=f"{type(e).__name__}: {e}")) from e
    _READY.add(full_key)
    return result


_SMEM_SET = {}


def _set_smem(fn, nbytes):
    """Raise a kernel's dynamic shared-memory limit once (cuFuncSetAttribute, not a stream op)."""
    if nbytes > 48 * 1024 and _SMEM_SET.get(id(fn), 0) < nbytes:
        fn.max_dynamic_shared_size_bytes = nbytes
        _SMEM_SET[id(fn)] = nbytes


def _launch(spec, grid, block, args, smem=0):
    """Launch a compiled variant on the current stream (compiled and loaded on first use)."""
    def go():
        fn = get_function(spec)
        _set_smem(fn, smem)
        fn(grid, block, args, shared_mem=smem)
    _first_use(f"kernel {spec.name} ({spec.source})", spec, go)


def _preload(spec, smem=0):
    """Compile and load a variant without launching it, so a later capture finds it loaded."""
    _first_use(f"kernel {spec.name} ({spec.source})", ("load", spec),
               lambda: _set_smem(get_function(spec), smem))


def ptr(x):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if x is None else x


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------

def contiguous_aligned(x):
    """C-contiguous with a 16-byte aligned base (cp.async reads 16 bytes at a time)."""
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    y = workspace().empty(x.shape, x.dtype)
    y[...] = x
    return y


def normalize(x, dtype, groups, l2norm, dst=None):
    """(xhat contiguous, r (rows, groups) float32 or None) -- docs/semantics.md's grouped l2norm.
    dst: (xhat, r) arrays to write them into (contiguous, 16-byte aligned), else workspace ones."""
    x = contiguous_aligned(x)
    if not l2norm:
        return x, None
    d = x.shape[-1]
    rows = x.size // d if d else 0
    ws = workspace()
    xhat, r = dst if dst is not None else (ws.empty(x.shape, x.dtype), ws.empty((rows, groups), np.float32))
    if rows:
        layout = row_v8_layout(d, groups)
        if not (layout and _v8_launch("l2norm_rows", dtype, rows, layout[0], (x, xhat, r),
                                      (np.int64(rows), _i32(d), _i32(groups)) + tuple(map(_i32, layout)))):
            grid, block = _rows_grid(rows)
            _launch(KernelSpec("prep.cu", f"l2norm_rows<{CTYPE[dtype]}>"), grid, block,
                    (x, xhat, r, np.int64(rows), _i32(d), _i32(groups)))
    return xhat, r


def to_float32(x, dtype):
    """A float32 copy of x (bfloat16 raw-bit views included)."""
    x = contiguous_aligned(x)
    y = workspace().empty(x.shape, np.float32)
    if x.size:
        _launch(KernelSpec("prep.cu", f"cast_to_float<{CTYPE[dtype]}>"),
                (min(65535, -(-x.size // 256)),), (256,), (x, y, np.int64(x.size)))
    return y


def bias_args(bias, dtype):
    """(pointer array or None, strides in elements (0 on broadcast dims)) of a canonical bias."""
    if bias is None:
        return None, (0, 0, 0)
    if bias.strides[-1] != bias.itemsize or bias.data.ptr % bias.itemsize:
        bias = contiguous_aligned(bias)
    bb, hb = bias.shape[:2]
    st = [s // bias.itemsize for s in bias.strides]
    return bias, (0 if bb == 1 else st[0], 0 if hb == 1 else st[1], st[2])


def mask_arg(mask):
    if mask is None:
        return None
    m = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    if m.flags.c_contiguous:
        return m
    y = workspace().empty(m.shape, m.dtype)
    y[...] = m
    return y


def shift_needs_data(problem):
    """True when the fixed shift depends on the values (a bias, or q, k not normalised here)."""
    return (not problem.l2norm_qk) or (problem.bias is not None and problem.bias.size > 0)


def _device_stats(problem, q, k):
    """(largest row norm of q, of k, bias max, bias min), read back in one copy (one sync)."""
    cp = _cp()
    names, values = [], []
    if not problem.l2norm_qk:
        for name, x in (("q", q), ("k", k)):
            _, r = normalize(x, problem.dtype, 1, True)
            if r.size:
                # r = 1/||row||, 0 for rows too short to normalise: the largest norm is 1/min(r > 0)
                names.append(name)
                values.append(cp.where(r > 0, r, cp.float32(np.inf)).min())
    if problem.bias is not None and problem.bias.size:
        b32 = to_float32(problem.bias, problem.dtype)
        names += ["bmax", "bmin"]
        values += [b32.max(), b32.min()]
    host = dict(zip(names, cp.stack(values).get().tolist())) if values else {}
    norm = {}
    for name in ("q", "k"):
        rmin = np.float32(host.get(name, np.inf))
        norm[name] = float(np.float32(1.0) / rmin)      # 1/inf = 0: no row with a norm
    return norm["q"], norm["k"], host.get("bmax", 0.0), host.get("bmin", 0.0)


def choose_shift(problem, q, k):
    """The fixed softmax shift (natural units) or None for the online variant.

    q, k as the kernels read them (normalised unless l2norm_qk=False). When the logit range
    depends on the values it is read back from the device (one host synchronisation), except
    while the current stream is being captured: then None (the online variant, exact for any
    logits, so also for the values of every later replay).
    """
    p_dtype = "float16" if problem.dtype == "float16" else "float32"
    if not shift_needs_data(problem):
        return softmax_shift(logit_bound(problem), 0.0, 0.0, p_dtype)
    if workspace().capturing():
        return None
    qmax, kmax, bmax, bmin = _device_stats(problem, q, k)
    if problem.l2norm_qk:
        qmax = kmax = None
    return softmax_shift(logit_bound(problem, qmax, kmax), bmax, bmin, p_dtype)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

def keeps_normalised(problem):
    """True when gpu_forward can hand its normalised q, k (and their inverse norms) to the
    backward: l2norm_qk and at least one query and one key."""
    b, h, hk, i, j, d = problem.dims
    return problem.l2norm_qk and b * h * i > 0 and j > 0


def gpu_forward(problem, out, lse, keep=None):
    """Write out (b, h, i, d) and lse (b, h, i) float32 of a canonical CuPy Problem.

    keep (only where keeps_normalised): arrays (qhat (b, h, i, d), rq (b*h*i, groups) float32,
    khat (b, hk, j, d), rk (b*hk*j, groups) float32) that receive the normalised q, k and their
    inverse norms, so that gpu_backward(normalised=(rq, rk)) on qhat, khat skips normalising
    them again (two passes over q and k per training step)."""
    b, h, hk, i, j, d = problem.dims
    check_head_dim(d)
    if keep is not None and not keeps_normalised(problem):
        raise ValueError("keep: only calls with l2norm_qk and at least one query and key "
                         "normalise q and k")
    if b * h * i == 0:
        return
    if j == 0:                      # no keys: every row sees nothing
        out[...] = 0
        lse[...] = -np.inf
        return
    dtype = problem.dtype
    qdst, kdst = (keep[:2], keep[2:]) if keep is not None else (None, None)
    qhat, _ = normalize(problem.q, dtype, problem.groups, problem.l2norm_qk, qdst)
    khat, _ = normalize(problem.k, dtype, problem.groups, problem.l2norm_qk, kdst)
    v = contiguous_aligned(problem.v)
    shift = choose_shift(problem, qhat, khat)
    launch_forward(problem, qhat, khat, v, out, lse, shift)
    if shift is not None and shift_needs_data(problem):
        # A capture of this same call runs the online variant (no read-back there): load it now,
        # so the usual warm-up before a capture covers it on drivers that cannot load in capture.
        spec, _, _, smem = forward_config(problem, online=True)
        _preload(spec, smem)


def forward_config(problem, online):
    """(spec, grid, block, dynamic shared memory bytes) of the sm_80 forward kernel launch
    (the Hopper forward, fixed shift only, is hopper_launch's)."""
    b, h, hk, i, j, d = problem.dims
    dtype = problem.dtype
    dp = padded_dim(dtype, d)
    flag = "true" if online else "false"
    if dtype == "float32":
        return (KernelSpec("cosine_fwd.cu", f"attn_fwd_simt<{dp}, {flag}>"),
                (b * h * (-(-i // SIMT_ROWS)),), (128,), 0)
    warps = fwd_warps(dp)
    bm = 16 * warps
    spec = KernelSpec("cosine_fwd.cu", f"attn_fwd_mma<{dp}, {CTYPE[dtype]}, {flag}, {warps}>")
    return spec, (b * h * (-(-i // bm)),), (32 * warps,), (bm + 4 * MMA_BN) * (dp + 8) * 2


def launch_forward(problem, qhat, khat, v, out, lse, shift):
    b, h, hk, i, j, d = problem.dims
    online = shift is None
    bias, (sb, sh, si) = bias_args(problem.bias, problem.dtype)
    mask = mask_arg(problem.mask)
    args = (qhat, khat, v, ptr(bias), ptr(mask), out, lse, np.int64(sb), np.int64(sh), np.int64(si),
            _i32(b), _i32(h), _i32(hk), _i32(i), _i32(j), _i32(d), _i32(problem.causal),
            np.float32(problem.scale * math.log2(math.e)),
            np.float32(0.0 if online else shift * math.log2(math.e)))
    from . import hopper_launch
    if hopper_launch.covers(problem.dtype, d, online):
        ct = CTYPE[problem.dtype]
        _first_use(f"Hopper forward kernel ({ct}, d={d})", ("sm90-fwd", ct, d),
                   lambda: hopper_launch.launch(ct, d, args, b, h, i))
        return
    spec, grid, block, smem = forward_config(problem, online)
    _launch(spec, grid, block, args, smem)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

def _cast_into(dst, src32, dtype):
    """dst (type dtype, contiguous) <- float32 src."""
    if src32.size == 0:
        return
    _launch(KernelSpec("prep.cu", f"scale_cast<{CTYPE[dtype]}>"),
            (min(65535, -(-src32.size // 256)),), (256,),
            (src32, dst, np.int64(src32.size), np.float32(1.0)))


def _normalize_backward(dst, dxhat32, xhat, r, dtype, groups):
    """dst <- gradient through the grouped l2-normalisation (or a plain cast without it)."""
    if r is None:
        _cast_into(dst, dxhat32, dtype)
        return
    d = xhat.shape[-1]
    rows = xhat.size // d if d else 0
    if rows:
        layout = row_v8_layout(d, groups)
        if not (layout and _v8_launch("l2norm_backward", dtype, rows, layout[0], (dxhat32, xhat, r, dst),
                                      (np.int64(rows), _i32(d), _i32(groups)) + tuple(map(_i32, layout)))):
            grid, block = _rows_grid(rows)
            _launch(KernelSpec("prep.cu", f"l2norm_backward<{CTYPE[dtype]}>"), grid, block,
                    (dxhat32, xhat, r, dst, np.int64(rows), _i32(d), _i32(groups)))


def _bias_is_direct(problem):
    """True when every (batch, head) owns its bias elements: dS can be stored, not summed."""
    b, h = problem.dims[0], problem.dims[1]
    bb, hb = problem.bias.shape[:2]
    return (bb == b or b == 1) and (hb == h or h == 1)


# Sum of per-(batch, head) bias gradients over the dims a bias broadcasts on, in a fixed order
# (deterministic) and without temporary storage: CuPy's own reductions may take scratch memory
# from CuPy's pool (CUB), which must not happen inside a torch graph capture.
SUM_BROADCAST_NAME = "cupy_cosine_attn_sum_broadcast"
SUM_BROADCAST_SRC = r"""
extern "C" __global__ void cupy_cosine_attn_sum_broadcast(
        const float* __restrict__ full, float* __restrict__ red, long long n, long long plane,
        int b, int h, int hb, int sum_b, int sum_h) {
    // full: (b, h, plane) contiguous; red: (bb, hb, plane) contiguous with bb = sum_b ? 1 : b,
    // hb = sum_h ? 1 : h.
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < n;
         o += (long long)gridDim.x * blockDim.x) {
        const long long pos = o % plane;
        const long long bh = o / plane;
        const int oh = (int)(bh % hb);
        const int ob = (int)(bh / hb);
        const int b0 = sum_b ? 0 : ob, b1 = sum_b ? b : ob + 1;
        const int h0 = sum_h ? 0 : oh, h1 = sum_h ? h : oh + 1;
        float acc = 0.f;
        for (int bi = b0; bi < b1; ++bi)
            for (int hi = h0; hi < h1; ++hi)
                acc += full[((long long)bi * h + hi) * plane + pos];
        red[o] = acc;
    }
}
"""
_SUM_BROADCAST = []


def _sum_broadcast_kernel():
    if not _SUM_BROADCAST:
        _SUM_BROADCAST.append(_cp().RawKernel(SUM_BROADCAST_SRC, SUM_BROADCAST_NAME))
    return _SUM_BROADCAST[0]


def sum_to_bias_shape(full, bias_shape):
    """full (b, h, i, j) float32 contiguous summed over the dims where the bias (bb, hb, i, j)
    broadcasts, as a new contiguous float32 workspace array (full itself when none)."""
    b, h, i, j = full.shape
    bb, hb = bias_shape[:2]
    sum_b, sum_h = bb == 1 and b > 1, hb == 1 and h > 1
    if not (sum_b or sum_h):
        return full
    red = workspace().empty((bb, hb, i, j), np.float32)
    n = red.size
    if n:
        kernel = _sum_broadcast_kernel()
        args = (full, red, np.int64(n), np.int64(i * j), _i32(b), _i32(h), _i32(hb),
                _i32(sum_b), _i32(sum_h))
        _first_use("bias-gradient reduction kernel", SUM_BROADCAST_NAME,
                   lambda: kernel((min(65535, -(-n // 256)),), (256,), args))
    return red


def gpu_backward(problem, dout, out, lse, dq, dk, dv, dbias, deterministic=False,
                 normalised=None):
    """Write dq, dk, dv (and dbias, canonical (bb, hb, i, j)) of a canonical CuPy Problem.

    No host synchronisation: the backward reads the forward's lse, never a shift.
    normalised: (rq, rk) from gpu_forward's `keep`, when problem.q and problem.k are that
    forward's normalised qhat and khat (problem.l2norm_qk still set: dq, dk are the gradients
    of the caller's q and k, through the normalisation).
    """
    b, h, hk, i, j, d = problem.dims
    check_head_dim(d)
    if normalised is not None and not problem.l2norm_qk:
        raise ValueError("normalised: only for calls with l2norm_qk")
    dtype = problem.dtype
    ws = workspace()
    if dbias is not None:
        dbias.fill(0)        # accumulated into (atomics or the broadcast sum)
    if b * h * i == 0 or j == 0:
        for x in (dq, dk, dv):
            x.fill(0)        # no query or no key: every gradient is zero
        return
    # From here the kernels write every element of dq, dk and dv (the suite checks it with
    # NaN-poisoned outputs), so they are not cleared first: 3 fewer passes over memory.
    if normalised is not None:
        qhat, khat = contiguous_aligned(problem.q), contiguous_aligned(problem.k)
        rq, rk = normalised
    else:
        qhat, rq = normalize(problem.q, dtype, problem.groups, problem.l2norm_qk)
        khat, rk = normalize(problem.k, dtype, problem.groups, problem.l2norm_qk)
    v = contiguous_aligned(problem.v)
    dout = contiguous_aligned(dout)
    out = contiguous_aligned(out)
    lse = contiguous_aligned(lse)
    delta = ws.empty((b, h, i), np.float32)
    layout = row_v8_layout(d, 1)
    if not (layout and _v8_launch("row_dot", dtype, b * h * i, layout[0], (dout, out, delta),
                                  (np.int64(b * h * i), _i32(d), _i32(layout[0])))):
        grid, block = _rows_grid(b * h * i)
        _launch(KernelSpec("prep.cu", f"row_dot<{CTYPE[dtype]}>"), grid, block,
                (dout, out, delta, np.int64(b * h * i), _i32(d)))

    bias, (sb, sh, si) = bias_args(problem.bias, dtype)
    mask = mask_arg(problem.mask)
    dims = (_i32(b), _i32(h), _i32(hk), _i32(i), _i32(j), _i32(d), _i32(problem.causal),
            np.float32(problem.scale), np.float32(problem.scale * math.log2(math.e)))
    strides = (np.int64(sb), np.int64(sh), np.int64(si))
    dkhat = ws.empty((b, hk, j, d), np.float32)
    dp = padded_dim(dtype, d)
    full_bias = None        # per-(batch, head) dS, summed over broadcast dims afterwards
    atomic = dtype != "float32" and not deterministic
    if bias is not None and not atomic:
        full_bias = ws.zeros((b, h, i, j), np.float32)

    if dtype == "float32":
        dq32 = ws.empty((b, h, i, d), np.float32)
        dv32 = ws.empty((b, hk, j, d), np.float32)
        _launch(KernelSpec("cosine_bwd.cu", f"attn_bwd_q_simt<{dp}>"),
                (b * h * (-(-i // 4)),), (128,),
                (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, ptr(full_bias))
                + strides + dims)
        _launch(KernelSpec("cosine_bwd.cu", f"attn_bwd_kv_simt<{dp}>"),
                (b * hk * (-(-j // 4)),), (128,),
                (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dkhat, dv32)
                + strides + dims)
        _cast_into(dv, dv32, dtype)
    else:
        ct = CTYPE[dtype]
        direct = bias is not None and atomic and _bias_is_direct(problem)
        dbias_acc = None
        if bias is not None and atomic and not direct:
            dbias_acc = ws.zeros(problem.bias.shape, np.float32)
        dq32 = (ws.zeros if atomic else ws.empty)((b, h, i, d), np.float32)
        kv_args = ((qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, dkhat, dv,
                    ptr(dbias if direct else None), ptr(dbias_acc)) + strides + dims)
        from . import hopper_launch
        if hopper_launch.covers_backward(dtype, d, not atomic):
            _first_use(f"Hopper backward kernel ({ct}, d={d})", ("sm90-bwd", ct, d),
                       lambda: hopper_launch.launch_backward(ct, d, kv_args, b, hk, j))
        else:
            smem = (2 * 64 + 4 * 64) * (dp + 8) * 2 + 64 * 72 * 2 + 4 * 64 * 4
            _launch(KernelSpec("cosine_bwd.cu",
                               f"attn_bwd_kv_mma<{dp}, {ct}, {'true' if atomic else 'false'}>"),
                    (b * hk * (-(-j // 64)),), (128,), kv_args, smem)
        if not atomic:
            smem_q = (2 * 64 + 4 * 64) * (dp + 8) * 2
            _launch(KernelSpec("cosine_bwd.cu", f"attn_bwd_q_mma<{dp}, {ct}>"),
                    (b * h * (-(-i // 64)),), (128,),
                    (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, ptr(full_bias))
                    + strides + dims, smem_q)
        if dbias_acc is not None:
            _cast_into(dbias, dbias_acc, dtype)
    if full_bias is not None:
        _cast_into(dbias, sum_to_bias_shape(full_bias, problem.bias.shape), dtype)
    _normalize_backward(dq, dq32, qhat, rq, dtype, problem.groups)
    _normalize_backward(dk, dkhat, khat, rk, dtype, problem.groups)


def kernel_specs(dtype, d):
    """Every kernel variant a (dtype, head dim) call may launch: what warm-up and the CI
    compile check build."""
    check_head_dim(d)
    ct = CTYPE[dtype]
    dp = padded_dim(dtype, d)
    specs = [KernelSpec("prep.cu", f"{fn}<{ct}>")
             for fn in ("l2norm_rows", "l2norm_backward", "scale_cast", "cast_to_float", "row_dot",
                        "l2norm_rows_v8", "l2norm_backward_v8", "row_dot_v8")]
    specs.append(KernelSpec("prep.cu", "pack_row_stats"))   # the Hopper backward's row statistics
    for flag in ("false", "true"):
        if dtype == "float32":
            specs.append(KernelSpec("cosine_fwd.cu", f"attn_fwd_simt<{dp}, {flag}>"))
        else:
            specs.append(KernelSpec("cosine_fwd.cu", f"attn_fwd_mma<{dp}, {ct}, {flag}, {fwd_warps(dp)}>"))
            specs.append(KernelSpec("cosine_bwd.cu", f"attn_bwd_kv_mma<{dp}, {ct}, {flag}>"))
    if dtype == "float32":
        specs += [KernelSpec("cosine_bwd.cu", f"attn_bwd_q_simt<{dp}>"),
                  KernelSpec("cosine_bwd.cu", f"attn_bwd_kv_simt<{dp}>")]
    else:
        specs.append(KernelSpec("cosine_bwd.cu", f"attn_bwd_q_mma<{dp}, {ct}>"))
        from . import hopper_launch
        if d in hopper_launch.SM90_HEAD_DIMS:     # Hopper-only variants (skipped elsewhere)
            specs += hopper_launch.default_specs(ct, d)
    return specs


def all_kernel_specs():
    """Distinct variants over every supported dtype and head dim."""
    seen = {}
    for dtype in ("float16", "bfloat16", "float32"):
        for d in SUPPORTED_HEAD_DIMS:
            for s in kernel_specs(dtype, d):
                seen.setdefault(s, None)
    return list(seen)
