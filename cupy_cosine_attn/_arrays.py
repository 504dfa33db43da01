"""Which framework an array belongs to, its dtype name and device, without importing frameworks.

torch and CuPy are imported lazily: the package works with NumPy alone. Arrays of any other
library that speaks DLPack are taken in zero-copy as NumPy (CPU) or CuPy (CUDA) arrays.
"""
import numpy as np

# DLPack device types (dlpack.h): CPU, CUDA, CUDA pinned host, CUDA managed
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def kind_of(x, name="array"):
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    raise TypeError(f"{name} must be a NumPy array, a torch tensor, a CuPy array or an array "
                    f"with __dlpack__ on the CPU or a CUDA device, "
                    f"got {type(x).__module__}.{type(x).__name__}")


def dtype_name(x):
    dt = x.dtype
    if kind_of(x) == "torch":
        return str(dt).replace("torch.", "")
    name = np.dtype(dt).name
    return "bool" if name == "bool" else name


def device_of(x):
    kind = kind_of(x)
    if kind == "numpy":
        return "cpu"
    if kind == "torch":
        dev = x.device
        return "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index if dev.index is not None else 0}"
    return f"cuda:{x.device.id}"


def adopt_dlpack(x, name="array"):
    """x itself when it is None, NumPy, torch or CuPy; else a zero-copy NumPy (CPU) or CuPy (CUDA)
    view of an object exposing `__dlpack__` and `__dlpack_device__`. Anything else is returned
    unchanged for `kind_of` to reject with a TypeError naming the argument."""
    if x is None or isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] in ("torch", "cupy"):
        return x
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return x
    dev_type, _ = x.__dlpack_device__()
    try:
        if dev_type in (_DL_CPU, _DL_CUDA_HOST):
            return np.from_dlpack(x)
        if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            import cupy
            return cupy.from_dlpack(x)
    except (TypeError, ValueError, BufferError, RuntimeError) as e:
        raise TypeError(f"{name}: its DLPack export could not be taken in: {e}") from None
    raise TypeError(f"{name} is on DLPack device type {dev_type}; only CPU and CUDA arrays are "
                    f"supported")
