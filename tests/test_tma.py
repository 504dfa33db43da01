"""TMA tensor-map encoding on CPU, with the driver call replaced by a recorder: what the Hopper
forward asks the driver for, the memo, and the errors."""
import ctypes

import numpy as np
import pytest

from cupy_cosine_attn import tma


class Recorder:
    def __init__(self, status=0):
        self.calls, self.status = [], status

    def __call__(self, out, dtype, rank, addr, dims, strides, box, unit, inter, swz, l2, oob):
        self.calls.append(dict(dtype=dtype, rank=rank, addr=addr.value, dims=list(dims[:3]),
                               strides=list(strides[:2]), box=list(box[:3]), unit=list(unit[:3]),
                               swizzle=swz, oob=oob))
        ctypes.memset(out, 0xAB, 128)        # stands in for the driver's opaque map
        return self.status


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tma, "_encode_fn", lambda: rec)
    monkeypatch.setattr(tma, "_cache", {})
    return rec


def test_map_describes_slices_rows_columns_in_sw128_boxes(recorder):
    m = tma.rows_map(0x10000, slices=6, rows=1000, cols=128, box_rows=64)
    assert m.dtype == tma.TMA_MAP_DTYPE and m.dtype.itemsize == 128
    assert bytes(m.tobytes()) == b"\xab" * 128
    call, = recorder.calls
    assert call["rank"] == 3 and call["addr"] == 0x10000
    assert call["dims"] == [128, 1000, 6]
    assert call["strides"] == [256, 1000 * 256]           # bytes of dims 1 and 2
    assert call["box"] == [64, 64, 1] and call["unit"] == [1, 1, 1]
    assert call["swizzle"] == 3 and call["oob"] == 0       # 128-byte swizzle, zeros past the end


def test_maps_are_memoised_by_their_whole_description(recorder):
    a = tma.rows_map(0x10000, 2, 300, 64, 128)
    b = tma.rows_map(0x10000, 2, 300, 64, 128)
    assert a is b and len(recorder.calls) == 1
    tma.rows_map(0x10000, 2, 301, 64, 128)
    tma.rows_map(0x20000, 2, 300, 64, 128)
    assert len(recorder.calls) == 3


def test_misaligned_address_is_refused(recorder):
    with pytest.raises(ValueError, match="16-byte"):
        tma.rows_map(0x10008, 2, 300, 64, 128)
    assert recorder.calls == []


def test_driver_error_is_raised_with_its_code(monkeypatch):
    monkeypatch.setattr(tma, "_encode_fn", lambda: Recorder(status=1))
    monkeypatch.setattr(tma, "_cache", {})
    with pytest.raises(RuntimeError, match="error 1"):
        tma.rows_map(0x10000, 2, 300, 64, 128)


def test_zero_map_is_a_128_byte_scalar():
    assert tma.ZERO_MAP.dtype.itemsize == 128 and not np.any(np.frombuffer(tma.ZERO_MAP.tobytes(), np.uint8))
