"""GPU backward of cosine-similarity attention (kernels in kernels/attn_bwd.cu).

Passes, all on CuPy's current stream:
  1. D = rowsum(dout * out) (fp32).
  2. dK/dV kernel, one block per (key tile, kv head, batch): recomputes P from the saved lse,
     accumulates dV and dK_hat over every query head of its group (GQA without atomics), writes
     dbias, and in the fast mode adds dQ_hat into an fp32 buffer with atomics.
  3. deterministic mode (and fp32 inputs): a dQ kernel per (query tile, head) that loops the key
     tiles in a fixed order, so dq is bitwise reproducible.
  4. dq_hat, dk_hat (fp32) through the grouped l2 normalisation to dq, dk in the input dtype.

Arrays may be raw-bit views (bfloat16 as int16): the element type comes from `problem.dtype`.
"""
from __future__ import annotations

import numpy as np

from ..kernel_build import KernelSpec, get_function

SOURCE = "attn_bwd.cu"
CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 8))

# dbias modes (kernels/attn_bwd.cu)
DB_NONE, DB_STORE_T, DB_ATOMIC, DB_STORE_F = 0, 1, 2, 3
ROWS_PER_BLOCK = 8   # one warp per row in the row-wise passes


def check_head_dim(d):
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d={d} is not supported by the GPU backward; supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")


def tc_config(d):
    """(padded d, kv kernel (BN, BM, WC), dq kernel (BM, NW)) for the tensor-core kernels.

    Up to d=128 a warp keeps 16 keys x d/2 of dK and dV in registers; above that the key tile is
    halved and d split four ways so the accumulators still fit without spilling.
    """
    if d <= 128:
        dp = -(-d // 16) * 16
        return dp, (64, 64, 2), (64, 4)
    dp = -(-d // 32) * 32
    return dp, (32, 64, 4), (64, 8)


def kernel_names(dtype, d):
    """Template instantiations a (dtype, d) call uses (also used by the compile-only check)."""
    t = CTYPE[dtype]
    if dtype == "float32":
        return {"dot": f"attn_bwd_dot<{t}>", "kv": f"attn_bwd_kv_f32<{d}>",
                "dq": f"attn_bwd_dq_f32<{d}>", "norm": f"attn_bwd_l2norm<{t}>"}
    dp, (bn, bm, wc), (qbm, nw) = tc_config(d)
    return {"dot": f"attn_bwd_dot<{t}>", "kv": f"attn_bwd_kv_tc<{dp}, {t}, {bn}, {bm}, {wc}>",
            "dq": f"attn_bwd_dq_tc<{dp}, {t}, {qbm}, {nw}>", "norm": f"attn_bwd_l2norm<{t}>"}


def _smem_bytes(dtype, d):
    if dtype == "float32":
        srow = d + 4
        s = (4 * 32 * srow + 2 * 32 * 33 + 64) * 4
        return s, s
    dp, (bn, bm, wc), (qbm, nw) = tc_config(d)
    srow = dp + 8
    kv = (2 * bn * srow + 2 * bm * srow + 2 * bn * (bm + 8)) * 2 + 2 * bm * 4
    dq = (2 * 64 * srow + 2 * qbm * srow) * 2
    return kv, dq


def _cp():
    import cupy
    return cupy


def _fn(name):
    return get_function(KernelSpec(SOURCE, name))


_SMEM_SET = {}


def _with_smem(fn, nbytes):
    if nbytes > 48 * 1024 and _SMEM_SET.get(id(fn), 0) < nbytes:
        fn.max_dynamic_shared_size_bytes = nbytes
        _SMEM_SET[id(fn)] = nbytes
    return fn


def _aligned(x):
    """C-contiguous with a 16-byte aligned base (the kernels read 16 bytes per cp.async)."""
    cp = _cp()
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    y = cp.empty(x.shape, dtype=x.dtype)
    y[...] = x
    return y


def _writable(x):
    """x itself when the kernels can write it in place, else a contiguous scratch array."""
    cp = _cp()
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    return cp.empty(x.shape, dtype=x.dtype)


def _rows_launch(rows):
    return (int(-(-rows // ROWS_PER_BLOCK)),), (32 * ROWS_PER_BLOCK,)


def _normalize(x, dtype, groups, l2norm):
    """(xhat contiguous, r (rows, groups) fp32 or None), the forward's normalisation."""
    from ..gpu_launch import normalize
    return normalize(x, dtype, groups, l2norm)


def _from_f32(dtype, src32, xhat, rnorm, dst, groups):
    """dst (input dtype) = src32 mapped through the l2norm backward (or cast when rnorm is None)."""
    d = src32.shape[-1]
    rows = src32.size // d
    if rows == 0:
        return
    out = _writable(dst)
    grid, block = _rows_launch(rows)
    _fn(f"attn_bwd_l2norm<{CTYPE[dtype]}>")(
        grid, block, (src32, xhat if xhat is not None else np.uint64(0),
                      rnorm if rnorm is not None else np.uint64(0), out, np.int64(rows),
                      np.int32(d), np.int32(groups)))
    if out is not dst:
        dst[...] = out


def _strides(x, full_shape):
    """Element strides of a (bb, hb, i, j) array, 0 on the dims broadcast against full_shape."""
    st = [s // x.itemsize for s in x.strides]
    return tuple(0 if x.shape[a] == 1 and full_shape[a] != 1 else st[a] for a in range(4))


def gpu_backward(problem, dout4, out4, lse, dq, dk, dv, dbias, deterministic=False):
    """Write dq (b,h,i,d), dk, dv (b,hk,j,d) and dbias (bb,hb,i,j) (or None) of a CuPy Problem."""
    cp = _cp()
    b, h, hk, i, j, d = problem.dims
    dtype = problem.dtype
    if dtype not in CTYPE:
        raise TypeError(f"GPU backward supports float16, bfloat16, float32, got {dtype}")
    check_head_dim(d)
    if problem.is_empty or b * h * i == 0 or j == 0:
        for x in (dq, dk, dv, dbias):
            if x is not None:
                x[...] = 0
        return
    scale = float(problem.scale)
    names = kernel_names(dtype, d)
    smem_kv, smem_dq = _smem_bytes(dtype, d)

    qhat, rq = _normalize(problem.q, dtype, problem.groups, problem.l2norm_qk)
    khat, rk = _normalize(problem.k, dtype, problem.groups, problem.l2norm_qk)
    v = _aligned(problem.v)
    dout4 = _aligned(dout4)
    out4 = _aligned(out4)
    lse = cp.ascontiguousarray(lse, dtype=cp.float32)
    mask = None
    if problem.mask is not None:
        m = problem.mask
        mask = cp.ascontiguousarray(m.view(cp.uint8) if m.dtype == cp.bool_ else m)

    # 1. D = rowsum(dout * out)
    rows = b * h * i
    dsum = cp.empty((b, h, i), dtype=cp.float32)
    grid, block = _rows_launch(rows)
    _fn(names["dot"])(grid, block, (dout4, out4, dsum, np.int64(rows), np.int32(d)))

    # bias and its gradient target
    bias = problem.bias
    bias_ptr, bstr = np.uint64(0), (0, 0, 0, 0)
    db_mode, db_target, dbstr, db_after = DB_NONE, np.uint64(0), (0, 0, 0, 0), None
    if bias is not None:
        if bias.data.ptr % bias.itemsize:
            bias = _aligned(bias)
        bias_ptr, bstr = bias, _strides(bias, (b, h, i, j))
        bb, hb = bias.shape[:2]
        full = bb == b and hb == h
        if full:
            # one writer per element; causal skips whole tiles, so zero those first
            db_target = _writable(dbias)
            if problem.causal:
                db_target[...] = 0
            db_mode, dbstr = DB_STORE_T, _strides(db_target, (b, h, i, j))
            if db_target is not dbias:
                db_after = lambda: dbias.__setitem__(Ellipsis, db_target)  # noqa: E731
        elif not deterministic:
            buf = cp.zeros((bb, hb, i, j), dtype=cp.float32)
            db_mode, db_target, dbstr = DB_ATOMIC, buf, _strides(buf, (b, h, i, j))
            db_after = lambda: _from_f32(dtype, buf, None, None, dbias, 1)  # noqa: E731
        else:
            # fixed-order reduction over the broadcast dims of a full fp32 buffer
            buf = (cp.zeros if problem.causal else cp.empty)((b, h, i, j), dtype=cp.float32)
            db_mode, db_target, dbstr = DB_STORE_F, buf, _strides(buf, (b, h, i, j))
            axes = tuple(a for a, n in ((0, bb), (1, hb)) if n == 1)

            def db_after():
                _from_f32(dtype, cp.ascontiguousarray(buf.sum(axis=axes, keepdims=True)), None,
                          None, dbias, 1)

    use_atomic_dq = dtype != "float32" and not deterministic
    dq32 = (cp.zeros if use_atomic_dq else cp.empty)((b, h, i, d), dtype=cp.float32)
    dk32 = cp.empty((b, hk, j, d), dtype=cp.float32)
    dv_out = _writable(dv)

    def args(dq_atomic, with_dbias):
        return (qhat, khat, v, dout4, lse, dsum, mask if mask is not None else np.uint64(0),
                bias_ptr, *(np.int64(s) for s in bstr),
                db_target if with_dbias else np.uint64(0), *(np.int64(s) for s in dbstr),
                dq32, dk32, dv_out, np.int32(b), np.int32(h), np.int32(hk), np.int32(i),
                np.int32(j), np.int32(d), np.float32(scale), np.int32(problem.causal),
                np.int32(db_mode if with_dbias else DB_NONE), np.int32(dq_atomic))

    # 2. dK, dV (+ dQ atomics, dbias)
    if dtype == "float32":
        kv_grid, kv_block = (-(-j // 32), hk, b), (256,)
        dq_grid, dq_block = (-(-i // 32), h, b), (256,)
    else:
        _, (bn, _bm, _wc), (qbm, nw) = tc_config(d)
        kv_grid, kv_block = (-(-j // bn), hk, b), (32 * (bn // 16) * _wc,)
        dq_grid, dq_block = (-(-i // qbm), h, b), (32 * nw,)
    _with_smem(_fn(names["kv"]), smem_kv)(kv_grid, kv_block, args(int(use_atomic_dq), True),
                                          shared_mem=smem_kv)
    # 3. dQ without atomics
    if not use_atomic_dq:
        _with_smem(_fn(names["dq"]), smem_dq)(dq_grid, dq_block, args(0, False),
                                              shared_mem=smem_dq)

    # 4. outputs
    if dv_out is not dv:
        dv[...] = dv_out
    _from_f32(dtype, dq32, qhat if rq is not None else None, rq, dq, problem.groups)
    _from_f32(dtype, dk32, khat if rk is not None else None, rk, dk, problem.groups)
    if db_after is not None:
        db_after()
