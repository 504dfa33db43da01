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
