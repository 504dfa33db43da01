"""Which framework an array belongs to, its dtype name and device, without importing frameworks.

torch and CuPy are imported lazily: the package works with NumPy alone.
"""
import numpy as np


def kind_of(x, name="array"):
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    raise TypeError(f"{name} must be a NumPy array, a torch tensor or a CuPy array, "
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
