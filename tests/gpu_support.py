"""GPU test gating: skip without CuPy or a CUDA device, fail instead when
CUPY_COSINE_ATTN_REQUIRE_GPU=1 (so a GPU run can never pass by skipping)."""
import os

import pytest

REQUIRED = os.environ.get("CUPY_COSINE_ATTN_REQUIRE_GPU") == "1"


def gpu_unavailable_reason():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # ImportError, CUDARuntimeError without a driver
        return f"CuPy/CUDA unavailable: {type(e).__name__}: {e}"
    try:
        import torch
        if not torch.cuda.is_available():
            return "torch has no CUDA"
    except ImportError:
        return "torch is not installed"
    return None


def nvrtc_available():
    """CuPy with a working NVRTC (compiling needs no GPU)."""
    try:
        import cupy
        cupy.cuda.nvrtc.getVersion()
        return True
    except Exception:
        return False


def require_gpu():
    """Call at module level of a GPU test file."""
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    if REQUIRED:
        raise RuntimeError(f"CUPY_COSINE_ATTN_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


# Calls with neither a key mask nor a bias run the lean Hopper copies (at d = 128 the
# warp-specialised forward, at both of its tile shapes, and the backward with its 3-stage ring);
# the longer cases refill every ring stage several times.
LEAN_CASES = [dict(i=128, j=128), dict(i=1, j=77), dict(i=200, j=77, causal=True),
              dict(i=90, j=190, hk=2, causal=True), dict(i=333, j=1000),
              dict(i=700, j=1100, causal=True, hk=2)]


def lean_hopper_cases(test):
    """Parametrise test(dtype_name, d, case) over fp16/bf16, the Hopper head dims and LEAN_CASES."""
    for mark in (pytest.mark.parametrize("case", LEAN_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())),
                 pytest.mark.parametrize("d", [64, 128, 256]),
                 pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])):
        test = mark(test)
    return test
