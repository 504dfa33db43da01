"""The few array operations the reference and the CPU tiled path need, for NumPy and torch alike.

One small class per framework keeps the attention code itself framework-free.
"""
import numpy as np


class NumpyOps:
    name = "numpy"

    @staticmethod
    def compute_dtype(dtype_name):
        return np.float64 if dtype_name == "float64" else np.float32

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(dtype, copy=False)

    @staticmethod
    def to_dtype_name(x, dtype_name):
        if dtype_name == "bfloat16":
            import ml_dtypes  # NumPy bfloat16 arrays come from ml_dtypes
            return x.astype(ml_dtypes.bfloat16)
        return x.astype(np.dtype(dtype_name))

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def full(shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    @staticmethod
    def mT(x):
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def sum(x, axis, keepdim=False):
        return x.sum(axis=axis, keepdims=keepdim)

    @staticmethod
    def amax(x, axis, keepdim=False):
        return x.max(axis=axis, keepdims=keepdim)

    @staticmethod
    def exp_(x):
        with np.errstate(over="ignore"):   # hidden keys may overflow; they are zeroed next
            return np.exp(x, out=x)

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)
    isfinite = staticmethod(np.isfinite)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def arange(n):
        return np.arange(n)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def scalar(x):
        return float(x)

    @staticmethod
    def contiguous(x):
        return np.ascontiguousarray(x)

    @staticmethod
    def keep_where(x, keep):
        """x[~keep] = 0 in place (keep broadcasts against x); a hidden inf becomes 0, not NaN."""
        np.copyto(x, 0.0, where=~keep)

    @staticmethod
    def mm_acc(acc, a, b):
        """acc += a @ b in place (acc is a view into a larger array)."""
        acc += a @ b

    @staticmethod
    def mm(a, b, out=None):
        """a @ b with b broadcast over a's second dim: (C, g, X, Y) @ (C, 1, Y, Z)."""
        return np.matmul(a, b, out=out)

    @staticmethod
    def flat_empty(n, dtype):
        return np.empty(n, dtype=dtype)


class TorchOps:
    name = "torch"

    @staticmethod
    def compute_dtype(dtype_name):
        import torch
        return torch.float64 if dtype_name == "float64" else torch.float32

    @staticmethod
    def cast(x, dtype):
        return x.to(dtype)

    @staticmethod
    def to_dtype_name(x, dtype_name):
        import torch
        return x.to(getattr(torch, dtype_name))

    @staticmethod
    def zeros(shape, dtype):
        import torch
        return torch.zeros(shape, dtype=dtype)

    @staticmethod
    def full(shape, value, dtype):
        import torch
        return torch.full(shape, value, dtype=dtype)

    @staticmethod
    def mT(x):
        return x.transpose(-1, -2)

    @staticmethod
    def sum(x, axis, keepdim=False):
        return x.sum(dim=axis, keepdim=keepdim)

    @staticmethod
    def amax(x, axis, keepdim=False):
        return x.amax(dim=axis, keepdim=keepdim)

    @staticmethod
    def exp_(x):
        return x.exp_()

    @staticmethod
    def exp(x):
        return x.exp()

    @staticmethod
    def log(x):
        return x.log()

    @staticmethod
    def sqrt(x):
        return x.sqrt()

    @staticmethod
    def where(c, a, b):
        import torch
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a, dtype=b.dtype if isinstance(b, torch.Tensor) else None)
        if not isinstance(b, torch.Tensor):
            b = torch.tensor(b, dtype=a.dtype)
        return torch.where(c, a, b)

    @staticmethod
    def isfinite(x):
        return x.isfinite()

    @staticmethod
    def maximum(a, b):
        import torch
        return torch.maximum(a, b)

    @staticmethod
    def arange(n):
        import torch
        return torch.arange(n)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def scalar(x):
        return float(x)

    @staticmethod
    def contiguous(x):
        return x.contiguous()

    @staticmethod
    def keep_where(x, keep):
        """x[~keep] = 0 in place (keep broadcasts against x)."""
        x.masked_fill_(~keep, 0.0)

    @staticmethod
    def mm(a, b, out=None):
        """a @ b with b broadcast over a's second dim: (C, g, X, Y) @ (C, 1, Y, Z).

        Batched 3-D GEMMs per query head of a group: torch's 4-D broadcasting matmul copies.
        """
        import torch
        if out is None:
            out = torch.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)
        for g in range(a.shape[1]):
            torch.bmm(a[:, g], b[:, 0], out=out[:, g])
        return out

    @staticmethod
    def flat_empty(n, dtype):
        import torch
        return torch.empty(n, dtype=dtype)

    @staticmethod
    def mm_acc(acc, a, b):
        """acc += a @ b in place, through BLAS's accumulating GEMM (no temporary product)."""
        if a.dim() == 4 and b.dim() == 4 and a.shape[1] == 1 and b.shape[1] == 1:
            acc[:, 0].baddbmm_(a[:, 0], b[:, 0])
        elif a.dim() == 4 and b.dim() == 4 and b.shape[1] == 1:
            for g in range(a.shape[1]):
                acc[:, g].baddbmm_(a[:, g], b[:, 0])
        else:
            acc.add_(a @ b)


def ops_for(kind):
    if kind == "numpy":
        return NumpyOps
    if kind == "torch":
        return TorchOps
    raise TypeError(f"no CPU array operations for {kind} arrays")
