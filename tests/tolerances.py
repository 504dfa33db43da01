"""Relative-norm error allowed per input dtype, for outputs and every gradient, written once.

err = ||x - ref|| / ||ref||, with ref the float64 definition evaluated on the same (already
rounded) inputs, so only the implementation's own rounding counts. The numbers sit a few times
above what the CPU paths were measured to reach (see tests/README notes in the report):
float32 accumulation of O(1e3) terms gives ~1e-6; float16/bfloat16 results are dominated by
rounding the result itself to the dtype (2^-11 and 2^-8 per element).
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


# A gradient whose float64 reference is below VANISHING * ||upstream gradient|| is zero in exact
# arithmetic (e.g. dq, dk with a single visible key: the softmax is constant), so only rounding
# noise is left and a relative error means nothing. Such gradients must instead stay at rounding
# level: ||x - ref|| <= NOISE * max(scale, 1) * ||upstream||.
VANISHING = 1e-6
NOISE = 1e-4


def assert_grad_close(x, ref, dtype, what, upstream_norm, scale=1.0):
    ref_norm = float(np.linalg.norm(_as_f64(ref).ravel()))
    if ref_norm > VANISHING * upstream_norm:
        return assert_close(x, ref, dtype, what)
    x64, ref64 = _as_f64(x), _as_f64(ref)
    assert np.isfinite(x64).all(), f"{what}: not finite"
    err = float(np.linalg.norm((x64 - ref64).ravel()))
    bound = NOISE * max(float(scale), 1.0) * upstream_norm
    assert err <= bound, f"{what}: vanishing gradient off by {err:.3g} > {bound:.3g}"
    return err
