"""Argument checks and the canonical form of one attention call.

Every entry point (torch autograd, the functional NumPy/CuPy layer, the GPU launchers) goes through
`make_problem`, so every check and every layout rule lives here once.

Canonical form (views of the caller's arrays, no copies):
    q (b, h, i, d)    k, v (b, hk, j, d)    mask (b, j) bool or None
    bias (bb, hb, i, j) with bb in {1, b} and hb in {1, h}, or None
Query head `hq` reads key/value head `hq // (h // hk)`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from . import _arrays

CPU_DTYPES = ("float16", "bfloat16", "float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32")

# Largest logit range (in nats) that the fixed-shift softmax may see: exp(s - shift) must stay a
# normal float32 (e^-87 is the smallest) for every visible logit s, with room for row sums.
FIXED_SHIFT_WINDOW_F32 = 60.0
# float16 probabilities are rounded to float16 before P.V: keep the largest one of any row above
# float16's normal range (e^-9.7) in the worst case, after the headroom below.
FIXED_SHIFT_WINDOW_F16 = 20.0
# Vectors (or groups of a vector) shorter than this normalise to zero and pass zero gradient.
NORM_EPS = 1e-12
# With float16 P the shift is lowered by this many nats, so p = exp(s - shift) <= e^10 < 65504.
F16_HEADROOM = 10.0


@dataclass(frozen=True)
class Problem:
    kind: str                # "numpy" | "torch" | "cupy" (backend family of the inputs)
    device: str              # "cpu" or "cuda:N"
    dtype: str               # name of the input dtype
    q: Any                   # (b, h, i, d)
    k: Any                   # (b, hk, j, d)
    v: Any                   # (b, hk, j, d)
    mask: Any                # (b, j) bool or None
    bias: Any                # (bb, hb, i, j) or None
    scale: float
    groups: int
    causal: bool
    l2norm_qk: bool
    q_shape: Tuple[int, ...]          # caller's shapes, to map results back
    k_shape: Tuple[int, ...]
    bias_shape: Optional[Tuple[int, ...]]

    @property
    def dims(self):
        b, h, i, d = self.q.shape
        return b, h, self.k.shape[1], i, self.k.shape[2], d

    @property
    def lse_shape(self):
        return self.q_shape[:-1]

    @property
    def is_empty(self):
        return any(s == 0 for s in self.q.shape) or any(s == 0 for s in self.k.shape)


def _name_of_dtype(x):
    return _arrays.dtype_name(x)


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_scale_groups(scale, groups, d=None):
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if d is not None and d % groups != 0:
        raise ValueError(f"groups={groups} must divide the head dimension d={d}")
    return scale, groups


def make_problem(q, k, v, mask=None, attn_bias=None, scale=8, groups=1, causal=False,
                 l2norm_qk=True, attn_bias_batch_dim=False) -> Problem:
    """Check every argument and return the canonical `Problem` (raises TypeError/ValueError)."""
    kind = _arrays.kind_of(q, "q")
    for name, t in (("k", k), ("v", v)):
        if _arrays.kind_of(t, name) != kind:
            raise TypeError(f"{name} is a {_arrays.kind_of(t, name)} array but q is a {kind} array")
    dtype = _name_of_dtype(q)
    for name, t in (("k", k), ("v", v)):
        if _name_of_dtype(t) != dtype:
            raise TypeError(f"{name} has dtype {_name_of_dtype(t)} but q has dtype {dtype}")
    device = _arrays.device_of(q)
    for name, t in (("k", k), ("v", v)):
        if _arrays.device_of(t) != device:
            raise ValueError(f"{name} is on {_arrays.device_of(t)} but q is on {device}")
    allowed = CPU_DTYPES if device == "cpu" else GPU_DTYPES
    if dtype not in allowed:
        raise TypeError(f"q, k, v must be floating point ({', '.join(allowed)} on {device}), "
                        f"got {dtype}")
    causal = _check_flag("causal", causal)
    l2norm_qk = _check_flag("l2norm_qk", l2norm_qk)
    attn_bias_batch_dim = _check_flag("attn_bias_batch_dim", attn_bias_batch_dim)

    if q.ndim not in (3, 4):
        raise ValueError(f"q must be (b, h, n, d) or merged (b*h, n, d), got {q.ndim} dims "
                         f"{tuple(q.shape)}")
    if k.ndim not in (3, 4) or v.ndim != k.ndim:
        raise ValueError(f"k and v must both be 3- or 4-dim, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.ndim == 3 and k.ndim != 3:
        raise ValueError("with merged (b*h, n, d) q, k and v must be 3-dim too, got "
                         f"k {tuple(k.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")

    if q.ndim == 3:
        q4, k4, v4 = q[:, None], k[:, None], v[:, None]
    else:
        q4 = q
        k4, v4 = (k[:, None], v[:, None]) if k.ndim == 3 else (k, v)
    b, h, i, d = q4.shape
    kb, hk, j, kd = k4.shape
    if kb != b:
        raise ValueError(f"k/v batch {kb} does not match q batch {b}")
    if kd != d:
        raise ValueError(f"k/v head dim {kd} does not match q head dim {d}")
    if hk == 0 or (h % hk != 0):
        if not (h == 0 and hk == 0):
            raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk})")
    scale, groups = check_scale_groups(scale, groups, d)

    if mask is not None:
        if _arrays.kind_of(mask, "mask") != kind:
            raise TypeError(f"mask must be a {kind} array like q")
        if _name_of_dtype(mask) != "bool":
            raise TypeError(f"mask must be a bool array (True keeps the key), got "
                            f"{_name_of_dtype(mask)}")
        if tuple(mask.shape) != (b, j):
            raise ValueError(f"mask must have shape (b, j) = {(b, j)}, got {tuple(mask.shape)}")
        if _arrays.device_of(mask) != device:
            raise ValueError(f"mask is on {_arrays.device_of(mask)} but q is on {device}")

    bias4 = None
    bias_shape = None
    if attn_bias is not None:
        if _arrays.kind_of(attn_bias, "attn_bias") != kind:
            raise TypeError(f"attn_bias must be a {kind} array like q")
        if _name_of_dtype(attn_bias) != dtype:
            raise TypeError(f"attn_bias must have q's dtype {dtype}, got "
                            f"{_name_of_dtype(attn_bias)}")
        if _arrays.device_of(attn_bias) != device:
            raise ValueError(f"attn_bias is on {_arrays.device_of(attn_bias)} but q is on {device}")
        bias_shape = tuple(attn_bias.shape)
        if q.ndim == 3:
            allowed_shapes = {(b, i, j): "(b*h, i, j)"}
        else:
            allowed_shapes = {(b, h, i, j): "(b, h, i, j)"}
            if attn_bias_batch_dim:
                allowed_shapes[(b, i, j)] = "(b, i, j)"
            else:
                allowed_shapes[(h, i, j)] = "(h, i, j)"
        if bias_shape not in allowed_shapes or attn_bias.ndim not in (3, 4):
            raise ValueError(
                f"attn_bias must have shape {' or '.join(f'{v}={k}' for k, v in allowed_shapes.items())}"
                f" (attn_bias_batch_dim={attn_bias_batch_dim}), got {bias_shape}")
        if attn_bias.ndim == 4:
            bias4 = attn_bias
        elif q.ndim == 3 or attn_bias_batch_dim:
            bias4 = attn_bias[:, None]
        else:
            bias4 = attn_bias[None]

    return Problem(kind=kind, device=device, dtype=dtype, q=q4, k=k4, v=v4, mask=mask,
                   bias=bias4, scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                   q_shape=tuple(q.shape), k_shape=tuple(k.shape), bias_shape=bias_shape)


def fixed_shift_window(p_dtype):
    return FIXED_SHIFT_WINDOW_F16 if p_dtype == "float16" else FIXED_SHIFT_WINDOW_F32


def softmax_shift(logit_bound, bias_max, bias_min, p_dtype="float32"):
    """The constant subtracted from every logit before exp, or None when no constant is safe.

    Logits lie in [-logit_bound + bias_min, logit_bound + bias_max]. Cosine similarity bounds
    `logit_bound` by scale * groups (normalised q, k), so the softmax needs no running maximum
    as long as the whole range fits the exponent window of the probabilities' type; beyond that
    the caller must use an online (running-maximum) softmax.
    """
    spread = 2.0 * logit_bound + (bias_max - bias_min)
    if not math.isfinite(spread) or spread > fixed_shift_window(p_dtype):
        return None
    shift = logit_bound + bias_max
    if p_dtype == "float16":
        shift -= F16_HEADROOM
    return shift


def logit_bound(problem, q_norm_max=None, k_norm_max=None):
    """Largest possible |scale * q_hat . k| before bias: scale * groups for normalised q, k.

    With l2norm_qk=False the caller's vectors are used as given, so Cauchy-Schwarz with their
    largest norms bounds the logit instead (equal to scale * groups for normalised inputs).
    """
    if problem.l2norm_qk:
        return problem.scale * problem.groups
    return problem.scale * float(q_norm_max) * float(k_norm_max)
