"""TMA tensor maps for the Hopper kernels: encoded on the host by the CUDA driver
(cuTensorMapEncodeTiled, reached through ctypes so that no CUDA toolkit headers or bindings are
needed) and handed to a kernel by value as a 128-byte structured NumPy scalar, which CuPy passes
as a `const __grid_constant__ TmaMap` parameter (kernels/sm90.cuh).

A map holds the base address of its tensor, so it is made per call; encoding is a host function
(no stream work, so it is safe during CUDA-graph capture), and recent maps are memoised by their
full description.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

TMA_MAP_DTYPE = np.dtype([("words", np.uint64, (16,))])   # CUtensorMap: 128 bytes, 64-aligned
ZERO_MAP = np.zeros((), dtype=TMA_MAP_DTYPE)[()]           # for variants that take no TMA maps

# Driver enum values (cuda.h, CUDA 12+).
_DTYPE_UINT16 = 1          # CU_TENSOR_MAP_DATA_TYPE_UINT16: fp16 and bf16 move as raw 16-bit words
_DTYPE_FLOAT32 = 7         # CU_TENSOR_MAP_DATA_TYPE_FLOAT32: the dQ accumulator (reduce-add)
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0        # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements read as 0

_driver = None
_cache = {}
_CACHE_LIMIT = 256


def _encode_fn():
    global _driver
    if _driver is None:
        lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _driver = fn
    return _driver


def rows_map(ptr, slices, rows, cols, box_rows, box_cols=64, f32=False):
    """Tensor map over a contiguous (slices, rows, cols) array of 16-bit elements (f32: float32) at
    device address `ptr`, in boxes of box_rows x box_cols (128 bytes of columns: one sw128 slab)
    with the 128-byte swizzle; rows beyond `rows` of a slice read as zeros and are not written."""
    key = (int(ptr), slices, rows, cols, box_rows, box_cols, f32)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    size = 4 if f32 else 2
    if ptr % 16 or (cols * size) % 16:
        raise ValueError(f"TMA needs 16-byte aligned rows (address {ptr:#x}, {cols} columns)")
    out = np.zeros((), dtype=TMA_MAP_DTYPE)
    dims = (ctypes.c_uint64 * 3)(cols, rows, slices)
    strides = (ctypes.c_uint64 * 2)(cols * size, rows * cols * size)     # bytes, dims 1 and 2
    box = (ctypes.c_uint32 * 3)(box_cols, box_rows, 1)
    unit = (ctypes.c_uint32 * 3)(1, 1, 1)
    status = _encode_fn()(out.ctypes.data, _DTYPE_FLOAT32 if f32 else _DTYPE_UINT16, 3,
                          ctypes.c_void_p(int(ptr)), dims,
                          strides, box, unit, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B,
                          _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUDA driver error {status} "
                           f"(tensor {slices}x{rows}x{cols}, box {box_rows}x{box_cols})")
    value = out[()]
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = value
    return value
