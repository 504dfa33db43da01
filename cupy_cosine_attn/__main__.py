"""`python -m cupy_cosine_attn ...`: the same command line as `cupy-cosine-attn`."""
import sys

from .cli import main

sys.exit(main())
