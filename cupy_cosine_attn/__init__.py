"""cupy-cosine-attn: cosine-similarity attention with a softmax maximum known in advance.

GPU kernels are CUDA C++ compiled at run time by CuPy; NumPy and torch CPU inputs run a tiled
path. torch and CuPy are imported only when used.
"""
from ._version import __version__
from .api import backward, flash_cosine_sim_attention, forward
from .reference import l2norm_tensors, plain_cosine_sim_attention

__all__ = [
    "__version__",
    "flash_cosine_sim_attention",
    "plain_cosine_sim_attention",
    "l2norm_tensors",
    "forward",
    "backward",
]
