"""Tiled forward and backward on the CPU, for NumPy arrays and torch CPU tensors.

Memory beyond inputs, outputs and the bias gradient is O(n*d + tile^2): the i x j score matrix is
never formed. The softmax shift is a constant known before the first tile (docs/semantics.md), so
a tile's probabilities are final the moment they are computed: no running maximum, no rescaling.
Only when the logit range is too wide for that (problem.softmax_shift returns None) does the
forward fall back to an online softmax.

Loops run over batches and chunks of k/v heads; the heads of a chunk, and the h/hk query heads
that share each k/v head, go through every matmul together.
"""
import math

from ._xp import ops_for
from .problem import logit_bound, softmax_shift
from .reference import grouped_l2norm, grouped_l2norm_backward

ROW_TILE = 256           # causal: small row tiles waste little work on the diagonal
ROW_TILE_DENSE = 1024    # no causal mask: larger GEMMs and fewer steps
COL_TILE = 512
TILE_ELEMENTS = 1 << 20   # score-tile elements per step, all heads of a chunk together


class _Prepared:
    """Inputs in compute precision and (b, hk, g, n, d) layout, shared by forward and backward."""

    def __init__(self, problem):
        ops = self.ops = ops_for(problem.kind)
        b, h, hk, i, j, d = problem.dims
        self.b, self.h, self.hk, self.i, self.j, self.d = b, h, hk, i, j, d
        self.g = g = h // hk if hk else 1
        cd = self.cd = ops.compute_dtype(problem.dtype)
        q = ops.reshape(ops.cast(problem.q, cd), (b, hk, g, i, d))
        k = ops.cast(problem.k, cd)
        self.rq = self.rk = None
        if problem.l2norm_qk:
            q, self.rq = grouped_l2norm(q, problem.groups, ops, return_r=True)
            k, self.rk = grouped_l2norm(k, problem.groups, ops, return_r=True)
        self.qhat, self.khat = q, k
        self.khat_t = ops.contiguous(ops.mT(k))   # (b, hk, d, j): keys pre-transposed for NN GEMMs
        self.qs = q * problem.scale          # scale folded into the queries once
        self.v = ops.cast(problem.v, cd)
        self.bias = None
        self.bias_per_head = False
        if problem.bias is not None:         # canonical (bb, hb, i, j) -> (bb, hk|1, g|1, i, j)
            bb, hb = problem.bias.shape[:2]
            self.bias_per_head = hb == h and h != 1
            self.bias = ops.reshape(problem.bias, (bb, hk, g, i, j) if self.bias_per_head
                                    else (bb, 1, 1, i, j))
        self.mask = problem.mask
        self.causal = problem.causal
        self.problem = problem

    def bias_tile(self, bi, h0, h1, r0, r1, c0, c1):
        """(C|1, g|1, Ti, Tj) bias tile in compute precision."""
        bias = self.bias
        heads = slice(h0, h1) if self.bias_per_head else slice(0, 1)
        t = bias[bi if bias.shape[0] > 1 else 0, heads, :, r0:r1, c0:c1]
        return self.ops.cast(t, self.cd)

    def col_range(self, r1):
        """Key columns [0, end) that rows < r1 can see."""
        if not self.causal:
            return self.j
        return max(0, min(self.j, r1 + self.j - self.i))

    def first_row(self, c0):
        """First query row that can see key c0."""
        if not self.causal:
            return 0
        return max(0, c0 - (self.j - self.i))

    def visible_tile(self, bi, r0, r1, c0, c1):
        """Bool (Ti, Tj) or (1, Tj) of visible keys in this tile, or None when all are visible."""
        ops = self.ops
        vis = None
        if self.causal and c1 - 1 > r0 + self.j - self.i:   # the diagonal crosses this tile
            rows = ops.reshape(ops.arange(r1 - r0), (r1 - r0, 1)) + r0
            cols = ops.reshape(ops.arange(c1 - c0), (1, c1 - c0)) + c0
            vis = cols <= rows + (self.j - self.i)
        if self.mask is not None:
            m = ops.reshape(self.mask[bi, c0:c1], (1, c1 - c0))
            vis = m if vis is None else (vis & m)
        return vis

    def shift(self, p_dtype="float32"):
        ops, problem = self.ops, self.problem
        q_max = k_max = None
        if not problem.l2norm_qk:
            q_max = _max_norm(self.qhat, ops)
            k_max = _max_norm(self.khat, ops)
        bmax = bmin = 0.0
        if self.bias is not None:
            bmax = ops.scalar(self.bias.max())
            bmin = ops.scalar(self.bias.min())
        return softmax_shift(logit_bound(problem, q_max, k_max), bmax, bmin, p_dtype)


class _Scratch:
    """Reusable flat buffers handed out as contiguous arrays of any shape that fits.

    A fresh multi-megabyte score tile per step costs page faults on first touch; reusing one
    buffer per role keeps the tiles warm in cache too.
    """

    def __init__(self, ops, dtype):
        self.ops, self.dtype, self.buffers = ops, dtype, {}

    def get(self, role, shape):
        n = math.prod(shape)
        buf = self.buffers.get(role)
        if buf is None or buf.shape[0] < n:
            buf = self.buffers[role] = self.ops.flat_empty(n, self.dtype)
        return self.ops.reshape(buf[:n], shape)


def _max_norm(x, ops):
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        return 0.0
    return ops.scalar(ops.sqrt(ops.sum(x * x, axis=-1)).max())


def _zero_hidden(p, vis, ops):
    if vis is not None:
        ops.keep_where(p, vis)
    return p


def _head_chunks(pre, row_tile, col_tile):
    """(batch, first k/v head, last k/v head) chunks; heads of a chunk share every matmul.

    Chunks bound the score tile at TILE_ELEMENTS, so memory does not grow with n.
    """
    per_head = pre.g * min(row_tile, max(pre.i, 1)) * min(col_tile, max(pre.j, 1))
    step = max(1, TILE_ELEMENTS // max(per_head, 1))
    for bi in range(pre.b):
        for h0 in range(0, pre.hk, step):
            yield bi, h0, min(pre.hk, h0 + step)


def _row_tile(problem, row_tile):
    if row_tile is not None:
        return row_tile
    return ROW_TILE if problem.causal else ROW_TILE_DENSE


def tiled_forward(problem, row_tile=None, col_tile=COL_TILE):
    """(out (b, h, i, d) in compute dtype, lse (b, h, i) float32) of a canonical Problem."""
    row_tile = _row_tile(problem, row_tile)
    pre = _Prepared(problem)
    ops = pre.ops
    b, hk, g, i, j, d = pre.b, pre.hk, pre.g, pre.i, pre.j, pre.d
    out = ops.zeros((b, hk, g, i, d), pre.cd)
    lse = ops.full((b, hk, g, i), -math.inf, pre.cd)
    if b * hk * g * i > 0:
        shift = pre.shift() if j > 0 else 0.0
        scratch = _Scratch(ops, pre.cd)
        for bi, h0, h1 in _head_chunks(pre, row_tile, col_tile):
            for r0 in range(0, i, row_tile):
                r1 = min(i, r0 + row_tile)
                o_t, lse_t = _forward_rows(pre, shift, bi, h0, h1, r0, r1, col_tile, scratch)
                out[bi, h0:h1, :, r0:r1] = o_t
                lse[bi, h0:h1, :, r0:r1] = lse_t
    out = ops.reshape(out, (b, pre.h, i, d))
    lse = ops.reshape(lse, (b, pre.h, i))
    return out, lse


def _forward_rows(pre, shift, bi, h0, h1, r0, r1, col_tile, scratch):
    ops = pre.ops
    qt = pre.qs[bi, h0:h1, :, r0:r1]                       # (C, g, Ti, d)
    kt_all = pre.khat_t[bi, h0:h1, None]                   # (C, 1, d, j)
    v = pre.v[bi, h0:h1, :, None]                          # (C, j, 1, d)
    shape = (h1 - h0, pre.g, r1 - r0)
    acc = ops.zeros(shape + (pre.d,), pre.cd)
    lsum = ops.zeros(shape + (1,), pre.cd)
    online = shift is None
    m = ops.full(shape + (1,), -math.inf, pre.cd) if online else None
    for c0 in range(0, pre.col_range(r1), col_tile):
        c1 = min(pre.j, c0 + col_tile)
        s = ops.mm(qt, kt_all[..., c0:c1], scratch.get("s", shape + (c1 - c0,)))
        if pre.bias is not None:
            s += pre.bias_tile(bi, h0, h1, r0, r1, c0, c1)
        vis = pre.visible_tile(bi, r0, r1, c0, c1)
        if online:
            if vis is not None:
                s = ops.where(vis, s, -math.inf)
            m_new = ops.maximum(m, ops.amax(s, axis=-1, keepdim=True))
            m_safe = ops.where(ops.isfinite(m_new), m_new, 0.0)
            alpha = ops.exp(ops.where(ops.isfinite(m), m, m_safe) - m_safe)
            acc *= alpha
            lsum *= alpha
            s -= m_safe
            p = ops.exp_(s)
            m = m_new
        else:
            s -= shift
            p = _zero_hidden(ops.exp_(s), vis, ops)
        lsum += ops.sum(p, axis=-1, keepdim=True)
        ops.mm_acc(acc, p, _rows(v, c0, c1, ops))
    seen = lsum > 0
    out = acc / ops.where(seen, lsum, 1.0)
    base = ops.where(ops.isfinite(m), m, 0.0) if online else shift
    lse = ops.where(seen, ops.log(ops.where(seen, lsum, 1.0)) + base, -math.inf)
    return out, lse[..., 0]


def _rows(x, c0, c1, ops):
    """(C, j, 1, d) -> (C, 1, Tj, d)."""
    return ops.reshape(x[:, c0:c1], (x.shape[0], 1, c1 - c0, x.shape[-1]))


def tiled_backward(problem, dout, out, lse, row_tile=None, col_tile=COL_TILE):
    """(dq, dk, dv, dbias) in compute dtype, canonical shapes; dbias (bb, hb, i, j) or None."""
    row_tile = _row_tile(problem, row_tile)
    pre = _Prepared(problem)
    ops = pre.ops
    b, hk, g, i, j, d, cd = pre.b, pre.hk, pre.g, pre.i, pre.j, pre.d, pre.cd
    do = ops.reshape(ops.cast(dout, cd), (b, hk, g, i, d))
    o = ops.reshape(ops.cast(out, cd), (b, hk, g, i, d))
    delta = ops.sum(do * o, axis=-1, keepdim=True)                       # D = <dO, O>
    lse = ops.reshape(ops.cast(lse, cd), (b, hk, g, i, 1))
    lse = ops.where(ops.isfinite(lse), lse, math.inf)   # rows with no key: P = exp(-inf) = 0
    dqs = ops.zeros((b, hk, g, i, d), cd)
    dk = ops.zeros((b, hk, j, d), cd)
    dv = ops.zeros((b, hk, j, d), cd)
    dbias = ops.zeros(tuple(pre.bias.shape), cd) if pre.bias is not None else None
    scratch = _Scratch(ops, cd)
    k, v = pre.khat[:, :, :, None], pre.v[:, :, :, None]                # (b, hk, j, 1, d)
    for bi, h0, h1 in _head_chunks(pre, row_tile, col_tile):
        for c0 in range(0, j, col_tile):
            c1 = min(j, c0 + col_tile)
            kt, vt = _rows(k[bi, h0:h1], c0, c1, ops), _rows(v[bi, h0:h1], c0, c1, ops)
            dk_t = ops.zeros((h1 - h0, 1, c1 - c0, d), cd)
            dv_t = ops.zeros((h1 - h0, 1, c1 - c0, d), cd)
            start = (pre.first_row(c0) // row_tile) * row_tile
            for r0 in range(start, i, row_tile):
                r1 = min(i, r0 + row_tile)
                qt = pre.qs[bi, h0:h1, :, r0:r1]                         # (C, g, Ti, d)
                tile = (h1 - h0, g, r1 - r0, c1 - c0)
                s = ops.mm(qt, pre.khat_t[bi, h0:h1, None, :, c0:c1], scratch.get("s", tile))
                if pre.bias is not None:
                    s += pre.bias_tile(bi, h0, h1, r0, r1, c0, c1)
                s -= lse[bi, h0:h1, :, r0:r1]
                p = _zero_hidden(ops.exp_(s), pre.visible_tile(bi, r0, r1, c0, c1), ops)
                dot = do[bi, h0:h1, :, r0:r1]
                ops.mm_acc(dv_t, _flat_t(p, ops), _flat(dot, ops))        # sums over g too
                ds = ops.mm(dot, ops.mT(vt), scratch.get("ds", tile))
                ds -= delta[bi, h0:h1, :, r0:r1]
                ds *= p                                                   # dS = P (dP - D)
                ops.mm_acc(dqs[bi, h0:h1, :, r0:r1], ds, kt)
                ops.mm_acc(dk_t, _flat_t(ds, ops), _flat(qt, ops))
                if dbias is not None:
                    _add_bias_grad(pre, dbias, ds, bi, h0, h1, r0, r1, c0, c1)
            dk[bi, h0:h1, c0:c1] = dk_t[:, 0]
            dv[bi, h0:h1, c0:c1] = dv_t[:, 0]
    dqhat = dqs * problem.scale
    if problem.l2norm_qk:
        dq = grouped_l2norm_backward(dqhat, pre.qhat, pre.rq, problem.groups, ops)
        dk = grouped_l2norm_backward(dk, pre.khat, pre.rk, problem.groups, ops)
    else:
        dq = dqhat
    dq = ops.reshape(dq, (b, pre.h, i, d))
    if dbias is not None:
        dbias = ops.reshape(dbias, tuple(problem.bias.shape))
    return dq, dk, dv, dbias


def _flat(x, ops):
    """(C, g, r, d) -> (C, 1, g*r, d), so a sum over g of x_g^T y_g is one GEMM per head."""
    return ops.reshape(x, (x.shape[0], 1, x.shape[1] * x.shape[2], x.shape[3]))


def _flat_t(x, ops):
    """(C, g, r, c) -> (C, 1, c, g*r): the transposed partner of _flat."""
    return ops.mT(_flat(x, ops))


def _add_bias_grad(pre, dbias, ds, bi, h0, h1, r0, r1, c0, c1):
    """Add a tile's dS into the bias gradient, summing over the dims the bias broadcasts over."""
    bsel = bi if dbias.shape[0] > 1 else 0
    if pre.bias_per_head:
        dbias[bsel, h0:h1, :, r0:r1, c0:c1] += ds
    else:
        dbias[bsel, 0, 0, r0:r1, c0:c1] += pre.ops.sum(ds, axis=(0, 1))
