"""Relative-norm error allowed per input dtype, for outputs and every gradient, written once.

err = ||x - ref|| / ||ref||, with ref the float64 definition evaluated on the same (already
rounded) inputs, so only the implementation's own rounding counts. Largest errors measured on
the CPU paths over the whole suite with 300 hypothesis examples per property test:
out float64 1.9e-15, float32 1.2e-6, float16 2.2e-4, bfloat16 1.8e-3 (the last two are the
rounding of the result itself, 2^-12 and 2^-9 relative); gradients (relative to the floor
below) float16 3e-4, bfloat16 2e-3. The limits sit 8-20x above those.
"""
import math

import numpy as np

TOLERANCE = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 5e-3,
    "bfloat16": 3e-2,
}


def dtype_name(x):
    """'float32', 'bfloat16', ... for a torch tensor, NumPy array or dtype."""
    dt = getattr(x, "dtype", x)
    s = str(dt)
    return s.replace("torch.", "") if s.startswith("torch.") else np.dtype(dt).name


def _as_f64(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x).astype(np.float64)


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; any NaN or inf in x (or ref) gives inf, so never passes.

    When ref is exactly zero the absolute norm ||x|| is returned instead.
    """
    x, ref = _as_f64(x), _as_f64(ref)
    assert x.shape == ref.shape, f"shape {x.shape} != reference shape {ref.shape}"
    if not (np.isfinite(x).all() and np.isfinite(ref).all()):
        return math.inf
    num = float(np.linalg.norm((x - ref).ravel()))
    den = float(np.linalg.norm(ref.ravel()))
    return num / den if den > 0 else num


def assert_close(x, ref, dtype, what="output"):
    """Fails unless rel_err(x, ref) <= TOLERANCE[dtype] (dtype: name or an array of that dtype)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    tol = TOLERANCE[name]
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({name})"
    return err


# Gradients are compared relative to max(||ref||, ||floor||), where `floor` is the same gradient
# computed from the magnitudes A = P (|dP| + |D|) that the softmax gradient dS = P (dP - D)
# cancels (conftest.ref_grads(with_floor=True)). When the softmax is nearly one-hot those terms
# cancel to a tiny gradient, and float32 accumulation is accurate only relative to them
# (measured: dq error 4e-5 relative to the gradient for i=1, j=2 in float32 with the formula
# evaluated exactly as documented). Where even the floor is below VANISHING * ||upstream||
# (e.g. groups == d: the normalisation's gradient is exactly 0), the gradient must just stay at
# rounding level: ||x - ref|| <= NOISE * max(scale, 1) * ||upstream||.
VANISHING = 1e-6
NOISE = 1e-4


def assert_grad_close(x, ref, dtype, what, upstream_norm, scale=1.0, floor=None):
    x64, ref64 = _as_f64(x), _as_f64(ref)
    assert np.isfinite(x64).all(), f"{what}: not finite"
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    ref_norm = float(np.linalg.norm(ref64.ravel()))
    floor_norm = 0.0 if floor is None else float(np.linalg.norm(_as_f64(floor).ravel()))
    den = max(ref_norm, floor_norm)
    err = float(np.linalg.norm((x64 - ref64).ravel()))
    if den > VANISHING * upstream_norm:
        tol = TOLERANCE[name]
        assert err <= tol * den, (f"{what}: error {err:.3g} = {err / den:.3g} x max(||ref|| "
                                  f"{ref_norm:.3g}, floor {floor_norm:.3g}) > {tol:g} ({name})")
        return err / den
    bound = NOISE * max(float(scale), 1.0) * upstream_norm
    assert err <= bound, f"{what}: vanishing gradient off by {err:.3g} > {bound:.3g}"
    return err
