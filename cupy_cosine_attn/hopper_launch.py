"""The Hopper (sm_90a, wgmma) kernels: which calls they cover, their variants, their launches.

Forward: fp16/bf16, head dims in SM90_HEAD_DIMS, a fixed softmax shift (the online variant stays
on the sm_80 kernels). Backward: the same dtypes and head dims with atomic dQ (deterministic=True
keeps the sm_80 fixed-order dQ pass). Both need a device of compute capability 9.0; everything
else -- and any call when CUPY_COSINE_ATTN_SM90=0 -- runs on the sm_80 kernels
(gpu_launch.kernel_path says which family a call uses).
"""
from __future__ import annotations

import os

import numpy as np

from . import tma
from .kernel_build import KernelSpec, get_function

SM90_HEAD_DIMS = (64, 128, 256)        # forward and backward
TUNED_HEAD_DIMS = (64, 128)            # with the full set of tile variants (d = 256: one shape)
SMEM_LIMIT = 227 * 1024                # sm_90 opt-in maximum of dynamic shared memory per block

# Tuning knobs (environment): the defaults are the fastest variants measured on an H200
# (benchmarks/NOTES.md); each knob takes only the values its kernel template is built for.
_KNOBS = {
    "CUPY_COSINE_ATTN_SM90_BN": (64, 128),        # forward: keys per tile
    "CUPY_COSINE_ATTN_SM90_WGS": (1, 2, 3),       # forward: warpgroups (64 query rows each)
    "CUPY_COSINE_ATTN_SM90_QREG": (0, 1),         # forward: Q in registers for QK^T
    "CUPY_COSINE_ATTN_SM90_TMA": (0, 1),          # tiles by TMA (else cp.async): fwd K/V, bwd Q/dO
    "CUPY_COSINE_ATTN_SM90_RELEASE": (0, 1),      # forward with TMA: per-stage release, no CTA barrier
    "CUPY_COSINE_ATTN_SM90_WS": (0, 1, 2),        # forward: producer warpgroup (+ ping-pong: 2)
    "CUPY_COSINE_ATTN_SM90_BWD_WGS": (1, 2),      # backward, d = 64: warpgroups (64 keys each); d = 256: column-half layout
    "CUPY_COSINE_ATTN_SM90_BWD_BM": (64, 128),    # backward, d = 64 with 2 warpgroups: queries per step
    "CUPY_COSINE_ATTN_SM90_DQ": (0, 1, 2, 3, 4),  # backward dQ: atomics / bulk rows / bulk blocks / TMA / vector red
    "CUPY_COSINE_ATTN_SM90_BWD_OVERLAP": (0, 1, 2),  # backward: exp under dP^T, dS^T under dV (+ dK late: 2)
    "CUPY_COSINE_ATTN_SM90_STAGGER": (0, 1),      # both, no causal mask: CTAs of a head start on different tiles
}


def _knob(name, default):
    """The integer value of tuning knob `name`, or `default` when unset; ValueError otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    allowed = _KNOBS[name]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value not in allowed:
        raise ValueError(f"{name}={raw!r} is not supported; use one of {', '.join(map(str, allowed))}")
    return value


# Causal calls at d = 128 with at most this many keys use 64-key tiles and one warpgroup per CTA
# (two CTAs per SM): measured faster there than 128-key tiles shared by two warpgroups, whose
# diagonal tiles waste more work (benchmarks/NOTES.md, v4).
SMALL_CAUSAL_KEYS = 8192


def _small_causal(d, j, causal):
    return d == 128 and bool(causal) and j is not None and j <= SMALL_CAUSAL_KEYS


def sm90_bn(d, j=None, causal=False):
    """Keys per forward tile (measured on an H200: benchmarks/NOTES.md); j and causal describe
    the call (None: the long-sequence choice)."""
    return _knob("CUPY_COSINE_ATTN_SM90_BN", 64 if d == 256 or _small_causal(d, j, causal) else 128)


def sm90_wgs(d, j=None, causal=False):
    """Consumer warpgroups (64 query rows each) per forward CTA (measured: benchmarks/NOTES.md)."""
    return _knob("CUPY_COSINE_ATTN_SM90_WGS",
                 1 if d == 64 or _small_causal(d, j, causal) else 2)   # d = 256: two


def sm90_ws_wgs(d, wgs=None, ws=1):
    """Consumer warpgroups of the warp-specialised forward `ws`: 3 at d = 64 (192 query rows
    share each K/V tile; each consumer gets 160 registers), else 2 (240 registers each), and
    always 2 for ping-pong (ws = 2); `wgs` or CUPY_COSINE_ATTN_SM90_WGS overrides (at least 2)."""
    if wgs is None:
        wgs = _knob("CUPY_COSINE_ATTN_SM90_WGS", 3 if d == 64 and ws != 2 else 2)
    wgs = max(2, wgs)
    if ws == 2 and wgs != 2:
        raise ValueError(f"the ping-pong forward (CUPY_COSINE_ATTN_SM90_WS=2) takes two consumer "
                         f"warpgroups, not {wgs}")
    return wgs


def sm90_enabled():
    return os.environ.get("CUPY_COSINE_ATTN_SM90", "1") != "0"


def device_is_sm90():
    import cupy
    return cupy.cuda.Device().compute_capability == "90"


def covers(dtype, d, online):
    """True when the Hopper forward handles this (dtype, head dim, shift kind) on this device."""
    return (sm90_enabled() and dtype in ("float16", "bfloat16") and d in SM90_HEAD_DIMS
            and not online and device_is_sm90())


def sm90_qreg(d, bn):
    """Q as register A fragments for QK^T (RS form) in the forward, else from smem (SS form).
    With 64-key tiles the SS form's m64n64k16 steps need all of shared memory's bandwidth, so Q
    goes to registers there (not at d = 256, where it would take 64 registers beside O's 128);
    with 128-key tiles the SS form is the faster (benchmarks/NOTES.md, v6)."""
    return bool(_knob("CUPY_COSINE_ATTN_SM90_QREG", 1 if bn == 64 and d != 256 else 0))


def sm90_tma(d):
    """Streamed tiles (forward K and V, backward Q and dO) brought in by TMA (one issuing thread,
    mbarriers), else by cp.async from every thread."""
    return bool(_knob("CUPY_COSINE_ATTN_SM90_TMA", 1))


def sm90_release(d, wgs):
    """Forward ring stages released per warp on mbarriers instead of a CTA barrier per tile: the
    default for two warpgroups at d = 128, where the barrier was the largest stall (ncu) and the
    release measured faster (benchmarks/NOTES.md, v7)."""
    return bool(_knob("CUPY_COSINE_ATTN_SM90_RELEASE", 1 if d == 128 and wgs == 2 else 0))


# d = 64 calls without a causal mask with at least this many keys run the warp-specialised
# forward with three consumers: +13-15% at n = 16384, level at 4096, 3-5% slower at 2048
# (benchmarks/NOTES.md, v10), where one 64-row warpgroup per CTA keeps more CTAs per head.
WS3_MIN_KEYS = 4096
# With a causal mask, from this many keys on (measured: +3-6% at 12288 keys, +6-7% at 16384,
# level at 8192 and 7-9% slower at 4096: benchmarks/NOTES.md, v10 and v11).
WS3_MIN_KEYS_CAUSAL = 12288


def sm90_ws(d, bias_mask=False, causal=False, j=None):
    """Warp-specialised forward: 1 = a producer warpgroup issuing the TMA copies in front of
    sm90_ws_wgs consumer warpgroups (implies TMA and stage release); 2 = two consumers taking
    turns to issue their matrix products (ping-pong); 0 = off. Default: 1 for calls without a
    bias or mask at d = 128 (benchmarks/NOTES.md, v7) and at d = 64 from WS3_MIN_KEYS keys on,
    WS3_MIN_KEYS_CAUSAL with a causal mask (j = None: a long call), with three consumers (v10,
    v11), unless the
    warpgroup or TMA knob asks for a layout it does not have. The bias/mask copies stay off it:
    they spill under the consumers' register share."""
    own_layout = os.environ.get("CUPY_COSINE_ATTN_SM90_WGS", "").strip() or not sm90_tma(d)
    lean = not bias_mask and not own_layout
    long64 = d == 64 and (j is None or j >= (WS3_MIN_KEYS_CAUSAL if causal else WS3_MIN_KEYS))
    return _knob("CUPY_COSINE_ATTN_SM90_WS", 1 if lean and (d == 128 or long64) else 0)


def sm90_stagger():
    """1: without a causal mask, the CTAs of one head start their walk over the key tiles
    (forward; not its copy for calls with a bias or key mask) or query tiles (backward) at
    different tiles, wrapping round, so they do not all read the same tile, or add into the same
    dQ rows, at the same time; 0: all start at tile 0.
    A launch argument, not a template parameter: both values run the same kernel. Off by default:
    measured no faster (d = 128 about 2% slower, benchmarks/NOTES.md, v8)."""
    return _knob("CUPY_COSINE_ATTN_SM90_STAGGER", 0)


def _cpp_bool(flag):
    return "true" if flag else "false"


def forward_spec(ctype, d, bn=None, wgs=None, qreg=None, use_tma=None, release=None, ws=None,
                 bias_mask=False):
    """The forward variant; bias_mask: built for calls with a bias or a key mask (the copy for
    calls with neither leaves their code out, and with it the registers it takes)."""
    ws = sm90_ws(d, bias_mask) if ws is None else ws
    bn = sm90_bn(d) if bn is None else bn
    wgs = sm90_ws_wgs(d, wgs, ws) if ws else (sm90_wgs(d) if wgs is None else wgs)
    qreg = sm90_qreg(d, bn) if qreg is None else qreg
    use_tma = ws or (sm90_tma(d) if use_tma is None else use_tma)
    release = ws or ((sm90_release(d, wgs) if release is None else release) and use_tma)
    flags = (", ".join(_cpp_bool(f) for f in (qreg, use_tma, release)) + f", {int(ws)}, "
             + _cpp_bool(bias_mask))
    return KernelSpec("cosine_fwd_sm90.cu", f"attn_fwd_wgmma<{d}, {ctype}, {bn}, {wgs}, {flags}>",
                      hopper=True)


def forward_smem(d, bn, wgs, ws=False):
    # Q tile + K and V rings (2 stages, 3 with WS) + their full and empty mbarriers, plus 1 KiB
    # to align the swizzled tiles to 1024 bytes.
    stages = 3 if ws else 2
    return 64 * wgs * d * 2 + 2 * stages * bn * d * 2 + 4 * stages * 8 + 1024


_SMEM_SET = {}


def _null(arg):
    """True for a null pointer argument (gpu_launch.ptr(None))."""
    return isinstance(arg, np.uint64) and int(arg) == 0


def launch(ctype, d, args, b, h, i, bn=None, wgs=None, qreg=None, use_tma=None, release=None,
           ws=None):
    """Launch the Hopper forward with attn_fwd_mma's argument tuple (plus the K and V tensor
    maps it makes when the variant loads by TMA)."""
    stagger = sm90_stagger()
    j, causal = int(args[14]), int(args[16])
    bias_mask = not (_null(args[3]) and _null(args[4]))
    ws = sm90_ws(d, bias_mask, causal, j) if ws is None else ws
    bn = sm90_bn(d, j, causal) if bn is None else bn
    wgs = sm90_ws_wgs(d, wgs, ws) if ws else (sm90_wgs(d, j, causal) if wgs is None else wgs)
    use_tma = ws or (sm90_tma(d) if use_tma is None else use_tma)
    smem = forward_smem(d, bn, wgs, ws)
    if smem > SMEM_LIMIT:     # only reachable through the tuning knobs
        raise ValueError(f"the Hopper forward at d={d} with {bn}-key tiles, {wgs} warpgroups"
                         f"{' and warp specialisation' if ws else ''} needs {smem} bytes of shared "
                         f"memory (at most {SMEM_LIMIT}): change CUPY_COSINE_ATTN_SM90_BN / _WGS / _WS")
    fn = get_function(forward_spec(ctype, d, bn, wgs, qreg, use_tma, release, ws, bias_mask))
    if use_tma:
        k, v, hk = args[1], args[2], int(args[12])
        maps = (tma.rows_map(k.data.ptr, b * hk, j, d, bn), tma.rows_map(v.data.ptr, b * hk, j, d, bn))
    else:
        maps = (tma.ZERO_MAP, tma.ZERO_MAP)
    if _SMEM_SET.get(id(fn), 0) < smem:      # once per kernel, before any graph capture
        fn.max_dynamic_shared_size_bytes = smem
        _SMEM_SET[id(fn)] = smem
    grid = (b * h * (-(-i // (64 * wgs))),)
    fn(grid, (128 * (wgs + (1 if ws else 0)),), args + maps + (np.int32(stagger),), shared_mem=smem)


def covers_backward(dtype, d, deterministic):
    return (sm90_enabled() and dtype in ("float16", "bfloat16") and d in SM90_HEAD_DIMS
            and not deterministic and device_is_sm90())


def sm90_bwd_wgs(d):
    """Warpgroups per backward CTA (measured: benchmarks/NOTES.md): 64 keys each, except at
    d = 256, where two take the two column halves of the same 64 keys (one: a CTA per half);
    d = 128 needs two (its dQ splits the head dim between them)."""
    wgs = _knob("CUPY_COSINE_ATTN_SM90_BWD_WGS", 2)
    return 2 if d == 128 else wgs


def sm90_bwd_bm(d, wgs):
    """Queries per step of the backward: 128 at d = 64 with two warpgroups, else 64 (the only
    tile the other configurations are built for)."""
    bm = _knob("CUPY_COSINE_ATTN_SM90_BWD_BM", 128)
    return bm if d == 64 and wgs == 2 else 64


def sm90_dq_mode(d, wgs, bm, overlap=1):
    """How dQ reaches global memory: 0 fp32 atomics, 1 bulk reduce-add per row, 2 per warp block
    of whole rows (only when a warpgroup holds every column, d = 64; else 1), 3 TMA tensor
    reduce-add of 16 x 32 boxes (the default: benchmarks/NOTES.md, v7; at d = 64 with the dQ
    deferred to the next tile, measured +11-12% over mode 4, v11), 4 vector reductions of
    column pairs from registers (no staging in shared memory; the default for the other d = 64
    layouts, measured +2% there and -8 to -12% at d = 128, benchmarks/NOTES.md, v8); `overlap`
    as the kernel runs it."""
    default = 4 if d == 64 and not _deferred_dq(d, wgs, bm, overlap) else 3
    mode = _knob("CUPY_COSINE_ATTN_SM90_DQ", default)
    return 1 if mode == 2 and d != 64 else mode


def sm90_bwd_overlap(d):
    """1: backward tiles commit S^T, dP^T and dV separately, so the exponentials run under dP^T
    and dS^T under dV (0: S^T and dP^T are waited for together); 2: at d = 128 with TMA loads,
    also dQ is issued before dK and dK left running into the next tile, whose loads move one
    tile earlier into a third stage; at d = 256 with two warpgroups, S^T and dP^T are split
    between the warpgroups instead of both computing both (kernel: ROLE); at d = 64 with two
    warpgroups and 128-query tiles, each tile's dQ is issued at the top of the next (kernel:
    DEFER); elsewhere it runs as 1."""
    return _knob("CUPY_COSINE_ATTN_SM90_BWD_OVERLAP", 2)


def backward_stages(d, use_tma, overlap):
    """Q/dO ring stages of the backward: 3 with overlap 2 at d = 128 with TMA loads, else 2 (the
    kernel runs overlap 1 there)."""
    return 3 if overlap == 2 and d == 128 and use_tma else 2


def _role_split(d, wgs, overlap):
    """d = 256, two warpgroups, overlap 2: S^T / P^T in one warpgroup, dP^T / dS^T in the other,
    P^T handed over in shared memory (the kernel's ROLE)."""
    return d == 256 and wgs == 2 and overlap == 2


def _deferred_dq(d, wgs, bm, overlap):
    """d = 64, two warpgroups, 128-query tiles, overlap 2: the dQ of each query tile is issued at
    the top of the next, ahead of its S^T and dP^T, with dS^T double-buffered (the kernel's
    DEFER)."""
    return d == 64 and wgs == 2 and bm == 128 and overlap == 2


def _bwd_config(d, dq, wgs, bm, use_tma, overlap):
    wgs = sm90_bwd_wgs(d) if wgs is None else wgs
    bm = sm90_bwd_bm(d, wgs) if bm is None else bm
    use_tma = sm90_tma(d) if use_tma is None else use_tma
    overlap = int(sm90_bwd_overlap(d) if overlap is None else overlap)
    if (overlap == 2 and not _role_split(d, wgs, overlap) and not _deferred_dq(d, wgs, bm, overlap)
            and backward_stages(d, use_tma, overlap) == 2):
        overlap = 1      # what the kernel runs where overlap 2 does not apply (one name per kernel)
    dq = sm90_dq_mode(d, wgs, bm, overlap) if dq is None else dq
    if d == 256 and wgs == 2 and dq in (1, 2, 3):
        dq = 4           # no shared memory left to stage dQ in: vector reductions from registers
    return dq, wgs, bm, use_tma, overlap


def backward_spec(ctype, d, dq=None, wgs=None, bm=None, use_tma=None, overlap=None):
    dq, wgs, bm, use_tma, overlap = _bwd_config(d, dq, wgs, bm, use_tma, overlap)
    return KernelSpec("cosine_bwd_sm90.cu",
                      f"attn_bwd_wgmma<{d}, {ctype}, {dq}, {wgs}, {bm}, {_cpp_bool(use_tma)}, "
                      f"{int(overlap)}>", hopper=True)


def backward_keys_per_cta(d, wgs):
    """64 per warpgroup, but 64 at d = 256, whose two warpgroups split the columns instead."""
    return 64 if d == 256 else 64 * wgs


def backward_column_splits(d, wgs=None):
    """CTAs per key tile: d = 256 with one warpgroup splits the output columns in halves between
    two CTAs (grid y; see the kernel); wgs None: the default layout."""
    wgs = sm90_bwd_wgs(d) if wgs is None else wgs
    return 2 if d == 256 and wgs == 1 else 1


def backward_smem(d, wgs, bm, overlap=1, use_tma=True, dq=3):
    # K, V tiles; Q and dO stages; the dS^T tile (and the fp32 P^T tile of ROLE); row statistics
    # stages (lse and delta, to a whole KiB); the dQ staging rows of the staged modes (16 rows of at most 64 + 8
    # floats per warp); an mbarrier per stage; 1 KiB alignment.
    bn, stages = backward_keys_per_cta(d, wgs), backward_stages(d, use_tma, overlap)
    staging = 4 * wgs * 16 * 72 * 4 if dq in (1, 2, 3) else 0
    p_tile = bn * bm * 4 if _role_split(d, wgs, overlap) else 0    # P^T handed between warpgroups
    ds_tiles = 2 if _deferred_dq(d, wgs, bm, overlap) else 1       # dS^T double-buffered
    return (2 * bn * d * 2 + stages * 2 * bm * d * 2 + ds_tiles * bn * bm * 2 + p_tile + -(-2 * stages * bm * 4 // 1024) * 1024
            + staging + 8 * stages + 1024)


def pack_row_stats(lse, delta, heads, i, bm):
    """The backward's row statistics (prep.cu's pack_row_stats): float32 (heads, tiles, 2, bm),
    per tile of bm query rows its lse·log2(e) and delta, padded past row i."""
    from .gpu_launch import workspace
    tiles = -(-i // bm)
    stats = workspace().empty((heads, tiles, 2, bm), np.float32)
    rows = stats.size // 2
    if rows:
        fn = get_function(KernelSpec("prep.cu", "pack_row_stats"))
        fn((min(65535, -(-rows // 256)),), (256,),
           (lse, delta, stats, np.int64(heads), np.int32(i), np.int32(tiles), np.int32(bm)))
    return stats


def launch_backward(ctype, d, args, b, hk, j, dq=None, wgs=None, bm=None, use_tma=None,
                    overlap=None):
    """Launch the Hopper backward with attn_bwd_kv_mma's argument tuple (atomic dQ): its lse and
    delta go in as one padded row-statistics array (pack_row_stats), and the Q and dO tensor maps
    are added when the variant loads by TMA."""
    stagger = sm90_stagger()
    dq, wgs, bm, use_tma, overlap = _bwd_config(d, dq, wgs, bm, use_tma, overlap)
    fn = get_function(backward_spec(ctype, d, dq, wgs, bm, use_tma, overlap))
    maps = [tma.ZERO_MAP] * 3
    h, i = int(args[17]), int(args[19])
    stats = pack_row_stats(args[4], args[5], b * h, i, bm)
    if use_tma:
        q, dout = args[0], args[3]
        maps[:2] = tma.rows_map(q.data.ptr, b * h, i, d, bm), tma.rows_map(dout.data.ptr, b * h, i, d, bm)
    if dq == 3:   # the fp32 dQ accumulator (b*h, i, d), added to in boxes of 16 rows x 32 columns
        maps[2] = tma.rows_map(args[8].data.ptr, b * h, i, d, 16, 32, f32=True)
    smem = backward_smem(d, wgs, bm, overlap, use_tma, dq)
    if _SMEM_SET.get(id(fn), 0) < smem:
        fn.max_dynamic_shared_size_bytes = smem
        _SMEM_SET[id(fn)] = smem
    fn((b * hk * (-(-j // backward_keys_per_cta(d, wgs))), backward_column_splits(d, wgs)), (128 * wgs,),
       args[:4] + (stats,) + args[6:] + tuple(maps) + (np.int32(stagger),), shared_mem=smem)


def default_specs(ctype, d):
    """The variants calls of this dtype and head dim launch by default (for warm-up)."""
    out = []
    for bias_mask in (False, True):
        for j, causal in ((None, False), (1, True)):      # long calls, short causal calls
            ws = sm90_ws(d, bias_mask, causal, j)
            wgs = sm90_ws_wgs(d, ws=ws) if ws else sm90_wgs(d, j, causal)
            spec = forward_spec(ctype, d, sm90_bn(d, j, causal), wgs, ws=ws, bias_mask=bias_mask)
            out += [spec] if spec not in out else []
    return out + [backward_spec(ctype, d)]


def specs():
    """Every Hopper variant (for warm-up and the CI compile check, sm_90a only)."""
    cts = ("__half", "__nv_bfloat16")
    fwd = ([(ct, d, bn, wgs, qreg, use_tma, release, 0) for ct in cts
            for d in TUNED_HEAD_DIMS for bn in (64, 128) for wgs in (1, 2) for qreg in (True, False)
            for (use_tma, release) in ((True, False), (True, True), (False, False))]
           + [(ct, d, bn, 2, qreg, True, True, ws) for ct in cts
              for d in TUNED_HEAD_DIMS for bn in (64, 128) for qreg in (True, False) for ws in (1, 2)]
           # d = 256: 64-key tiles (the only ones that fit), Q from shared memory
           + [(ct, 256, 64, wgs, False, use_tma, release, 0) for ct in cts
              for wgs in (1, 2) for (use_tma, release) in ((True, False), (True, True), (False, False))])
    # three consumers (calls without bias or mask): d = 64, and d = 128 where 64-key tiles fit
    ws3 = ([forward_spec(ct, 64, bn, 3, qreg, True, True, 1) for ct in cts for bn in (64, 128)
            for qreg in (True, False)] + [forward_spec(ct, 128, 64, 3, False, True, True, 1) for ct in cts])
    return ([forward_spec(*f, bias_mask=bias_mask) for f in fwd for bias_mask in (False, True)] + ws3
            + sorted({backward_spec(ct, d, dq, wgs, bm, use_tma, overlap) for ct in cts
                      for d in SM90_HEAD_DIMS for (wgs, bm) in BWD_TILES[d]
                      for dq in ((0, 1, 2, 3, 4) if d == 64 else (0, 1, 3, 4)) for use_tma in (True, False)
                      for overlap in (0, 1, 2)}, key=lambda spec: spec.name))


# (warpgroups, queries per step) the backward is built for at each head dim
BWD_TILES = {64: ((1, 64), (2, 64), (2, 128)), 128: ((2, 64),), 256: ((1, 64), (2, 64))}

