"""Kernel tests run Triton's interpreter on CPU tensors: the flag must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
