"""The portable mma.sync kernels where a Hopper GPU would take the wgmma path (fp16/bf16 at
d = 64 and 128): the forward and backward feature grids again with CUPY_COSINE_ATTN_SM90=0."""
import pytest

from gpu_support import require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import test_gpu_backward as bwd  # noqa: E402
import test_gpu_forward as fwd  # noqa: E402

MODULES = {"forward": fwd, "backward": bwd}
ids = lambda c: "-".join(f"{k}{v}" for k, v in c.items())  # noqa: E731


@pytest.fixture(autouse=True)
def sm80_only(monkeypatch):
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90", "0")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", fwd.CASES, ids=ids)
def test_forward_features(dtype_name, case):
    fwd.run_case(dtype_name, 64, **case)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", bwd.CASES, ids=ids)
def test_backward_features(dtype_name, case):
    bwd.run_case(dtype_name, 64, **case)


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_head_dims(which, dtype_name, d):
    MODULES[which].run_case(dtype_name, d, i=150, j=190, causal=True, mask=True, bias="heads", hk=2)
