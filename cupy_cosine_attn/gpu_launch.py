"""Launchers for the GPU kernels: turn a canonical Problem of CuPy arrays into kernel launches.

Arrays may be raw-bit views (bfloat16 as int16): every launch takes its element type from
`problem.dtype`, never from the arrays. Everything runs on CuPy's current stream, which the
caller (gpu_bridge) points at the framework's stream.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .kernel_build import KernelSpec, get_function
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
    """Which kernel family a (dtype, head dim) runs on."""
    check_head_dim(d)
    return "sm80-simt-fp32" if dtype == "float32" else "sm80-mma"


def _cp():
    import cupy
    return cupy


def _i32(x):
    return np.int32(x)


def _rows_grid(rows):
    return (max(1, -(-rows // WARPS_PER_ROW_BLOCK)),), (32 * WARPS_PER_ROW_BLOCK,)


def contiguous_aligned(x):
    """C-contiguous with a 16-byte aligned base (cp.async reads 16 bytes at a time)."""
    cp = _cp()
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    y = cp.empty(x.shape, dtype=x.dtype)
    y[...] = x
    return y


def normalize(x, dtype, groups, l2norm):
    """(xhat contiguous, r (rows, groups) float32 or None) -- docs/semantics.md's grouped l2norm."""
    cp = _cp()
    x = contiguous_aligned(x)
    if not l2norm:
        return x, None
    d = x.shape[-1]
    rows = x.size // d if d else 0
    xhat = cp.empty_like(x)
    r = cp.empty((rows, groups), dtype=cp.float32)
    if rows:
        fn = get_function(KernelSpec("prep.cu", f"l2norm_rows<{CTYPE[dtype]}>"))
        grid, block = _rows_grid(rows)
        fn(grid, block, (x, xhat, r, np.int64(rows), _i32(d), _i32(groups)))
    return xhat, r


def _max_norm(x, dtype):
    """Largest l2 norm of x's rows (for the logit bound when inputs are not normalised here)."""
    cp = _cp()
    _, r = normalize(x, dtype, 1, True)
    if r.size == 0:
        return 0.0
    nz = r[r > 0]
    return float((1.0 / nz.min()).get()) if nz.size else 0.0


def to_float32(x, dtype):
    """A float32 copy of x (bfloat16 raw-bit views included)."""
    cp = _cp()
    x = contiguous_aligned(x)
    y = cp.empty(x.shape, dtype=cp.float32)
    if x.size:
        fn = get_function(KernelSpec("prep.cu", f"cast_to_float<{CTYPE[dtype]}>"))
        fn((min(65535, -(-x.size // 256)),), (256,), (x, y, np.int64(x.size)))
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
    cp = _cp()
    m = mask.view(cp.uint8) if mask.dtype == cp.bool_ else mask
    return cp.ascontiguousarray(m)


def choose_shift(problem, q, k):
    """The fixed softmax shift (natural units) or None for the online variant."""
    p_dtype = "float16" if problem.dtype == "float16" else "float32"
    qmax = kmax = None
    if not problem.l2norm_qk:
        qmax, kmax = _max_norm(q, problem.dtype), _max_norm(k, problem.dtype)
    bmax = bmin = 0.0
    if problem.bias is not None and problem.bias.size:
        b32 = to_float32(problem.bias, problem.dtype)
        bmax, bmin = float(b32.max().get()), float(b32.min().get())
    return softmax_shift(logit_bound(problem, qmax, kmax), bmax, bmin, p_dtype)


_SMEM_SET = {}


def _set_smem(fn, nbytes):
    """Raise a kernel's dynamic shared-memory limit once (never during graph capture replays)."""
    if nbytes > 48 * 1024 and _SMEM_SET.get(id(fn), 0) < nbytes:
        fn.max_dynamic_shared_size_bytes = nbytes
        _SMEM_SET[id(fn)] = nbytes


def ptr(x):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if x is None else x


def gpu_forward(problem, out, lse):
    """Write out (b, h, i, d) and lse (b, h, i) float32 of a canonical CuPy Problem."""
    cp = _cp()
    b, h, hk, i, j, d = problem.dims
    check_head_dim(d)
    if b * h * i == 0:
        return
    if j == 0:                      # no keys: every row sees nothing
        out[...] = 0
        lse[...] = -np.inf
        return
    dtype = problem.dtype
    qhat, _ = normalize(problem.q, dtype, problem.groups, problem.l2norm_qk)
    khat, _ = normalize(problem.k, dtype, problem.groups, problem.l2norm_qk)
    v = contiguous_aligned(problem.v)
    shift = choose_shift(problem, qhat, khat)
    launch_forward(problem, qhat, khat, v, out, lse, shift)


def launch_forward(problem, qhat, khat, v, out, lse, shift):
    b, h, hk, i, j, d = problem.dims
    dtype = problem.dtype
    online = shift is None
    dp = padded_dim(dtype, d)
    bias, (sb, sh, si) = bias_args(problem.bias, dtype)
    mask = mask_arg(problem.mask)
    args = (qhat, khat, v, ptr(bias), ptr(mask), out, lse, np.int64(sb), np.int64(sh), np.int64(si),
            _i32(b), _i32(h), _i32(hk), _i32(i), _i32(j), _i32(d), _i32(problem.causal),
            np.float32(problem.scale * math.log2(math.e)),
            np.float32(0.0 if online else shift * math.log2(math.e)))
    flag = "true" if online else "false"
    if dtype == "float32":
        fn = get_function(KernelSpec("cosine_fwd.cu", f"attn_fwd_simt<{dp}, {flag}>"))
        fn((b * h * (-(-i // SIMT_ROWS)),), (128,), args)
    else:
        warps = fwd_warps(dp)
        fn = get_function(KernelSpec("cosine_fwd.cu",
                                     f"attn_fwd_mma<{dp}, {CTYPE[dtype]}, {flag}, {warps}>"))
        bm = 16 * warps
        smem = (bm + 4 * MMA_BN) * (dp + 8) * 2
        _set_smem(fn, smem)
        fn((b * h * (-(-i // bm)),), (32 * warps,), args, shared_mem=smem)


def _cast_into(dst, src32, dtype):
    """dst (type dtype, contiguous) <- float32 src."""
    if src32.size == 0:
        return
    fn = get_function(KernelSpec("prep.cu", f"scale_cast<{CTYPE[dtype]}>"))
    fn((min(65535, -(-src32.size // 256)),), (256,), (src32, dst, np.int64(src32.size), np.float32(1.0)))


def _normalize_backward(dst, dxhat32, xhat, r, dtype, groups):
    """dst <- gradient through the grouped l2-normalisation (or a plain cast without it)."""
    if r is None:
        _cast_into(dst, dxhat32, dtype)
        return
    d = xhat.shape[-1]
    rows = xhat.size // d if d else 0
    if rows:
        fn = get_function(KernelSpec("prep.cu", f"l2norm_backward<{CTYPE[dtype]}>"))
        grid, block = _rows_grid(rows)
        fn(grid, block, (dxhat32, xhat, r, dst, np.int64(rows), _i32(d), _i32(groups)))


def _bias_is_direct(problem):
    """True when every (batch, head) owns its bias elements: dS can be stored, not summed."""
    b, h = problem.dims[0], problem.dims[1]
    bb, hb = problem.bias.shape[:2]
    return (bb == b or b == 1) and (hb == h or h == 1)


def gpu_backward(problem, dout, out, lse, dq, dk, dv, dbias, deterministic=False):
    """Write dq, dk, dv (and dbias, canonical (bb, hb, i, j)) of a canonical CuPy Problem."""
    cp = _cp()
    b, h, hk, i, j, d = problem.dims
    check_head_dim(d)
    dtype = problem.dtype
    for x in (dq, dk, dv) + ((dbias,) if dbias is not None else ()):
        x.fill(0)
    if b * h * i == 0 or j == 0:
        return
    qhat, rq = normalize(problem.q, dtype, problem.groups, problem.l2norm_qk)
    khat, rk = normalize(problem.k, dtype, problem.groups, problem.l2norm_qk)
    v = contiguous_aligned(problem.v)
    dout = contiguous_aligned(dout)
    out = contiguous_aligned(out)
    lse = cp.ascontiguousarray(lse)
    delta = cp.empty((b, h, i), dtype=cp.float32)
    fn = get_function(KernelSpec("prep.cu", f"row_dot<{CTYPE[dtype]}>"))
    grid, block = _rows_grid(b * h * i)
    fn(grid, block, (dout, out, delta, np.int64(b * h * i), _i32(d)))

    bias, (sb, sh, si) = bias_args(problem.bias, dtype)
    mask = mask_arg(problem.mask)
    dims = (_i32(b), _i32(h), _i32(hk), _i32(i), _i32(j), _i32(d), _i32(problem.causal),
            np.float32(problem.scale), np.float32(problem.scale * math.log2(math.e)))
    strides = (np.int64(sb), np.int64(sh), np.int64(si))
    dkhat = cp.empty((b, hk, j, d), dtype=cp.float32)
    dp = padded_dim(dtype, d)
    full_bias = None        # per-(batch, head) dS, summed over broadcast dims afterwards
    atomic = dtype != "float32" and not deterministic
    if bias is not None and not atomic:
        full_bias = cp.zeros((b, h, i, j), dtype=cp.float32)

    if dtype == "float32":
        dq32 = cp.empty((b, h, i, d), dtype=cp.float32)
        dv32 = cp.empty((b, hk, j, d), dtype=cp.float32)
        fq = get_function(KernelSpec("cosine_bwd.cu", f"attn_bwd_q_simt<{dp}>"))
        fq((b * h * (-(-i // 4)),), (128,),
           (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, ptr(full_bias)) + strides + dims)
        fkv = get_function(KernelSpec("cosine_bwd.cu", f"attn_bwd_kv_simt<{dp}>"))
        fkv((b * hk * (-(-j // 4)),), (128,),
            (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dkhat, dv32) + strides + dims)
        _cast_into(dv, dv32, dtype)
    else:
        ct = CTYPE[dtype]
        direct = bias is not None and atomic and _bias_is_direct(problem)
        dbias_acc = None
        if bias is not None and atomic and not direct:
            dbias_acc = cp.zeros(problem.bias.shape, dtype=cp.float32)
        dq32 = cp.zeros((b, h, i, d), dtype=cp.float32) if atomic else cp.empty((b, h, i, d), dtype=cp.float32)
        fkv = get_function(KernelSpec("cosine_bwd.cu", f"attn_bwd_kv_mma<{dp}, {ct}, {'true' if atomic else 'false'}>"))
        smem = (2 * 64 + 4 * 64) * (dp + 8) * 2 + 64 * 72 * 2 + 4 * 64 * 4
        _set_smem(fkv, smem)
        fkv((b * hk * (-(-j // 64)),), (128,),
            (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, dkhat, dv,
             ptr(dbias if direct else None), ptr(dbias_acc)) + strides + dims, shared_mem=smem)
        if not atomic:
            fq = get_function(KernelSpec("cosine_bwd.cu", f"attn_bwd_q_mma<{dp}, {ct}>"))
            smem_q = (2 * 64 + 4 * 64) * (dp + 8) * 2
            _set_smem(fq, smem_q)
            fq((b * h * (-(-i // 64)),), (128,),
               (qhat, khat, v, dout, lse, delta, ptr(bias), ptr(mask), dq32, ptr(full_bias))
               + strides + dims, shared_mem=smem_q)
        if dbias_acc is not None:
            _cast_into(dbias, dbias_acc, dtype)
    if full_bias is not None:
        bb, hb = problem.bias.shape[:2]
        red = full_bias
        if bb == 1 and b > 1:
            red = red.sum(axis=0, keepdims=True)
        if hb == 1 and h > 1:
            red = red.sum(axis=1, keepdims=True)
        _cast_into(dbias, cp.ascontiguousarray(red), dtype)
    _normalize_backward(dq, dq32, qhat, rq, dtype, problem.groups)
    _normalize_backward(dk, dkhat, khat, rk, dtype, problem.groups)


def kernel_specs(dtype, d):
    """Every kernel variant a (dtype, head dim) call may launch: what warm-up and the CI
    compile check build."""
    check_head_dim(d)
    ct = CTYPE[dtype]
    dp = padded_dim(dtype, d)
    specs = [KernelSpec("prep.cu", f"{fn}<{ct}>")
             for fn in ("l2norm_rows", "l2norm_backward", "scale_cast", "cast_to_float", "row_dot")]
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
    return specs


def all_kernel_specs():
    """Distinct variants over every supported dtype and head dim."""
    seen = {}
    for dtype in ("float16", "bfloat16", "float32"):
        for d in SUPPORTED_HEAD_DIMS:
            for s in kernel_specs(dtype, d):
                seen.setdefault(s, None)
    return list(seen)
