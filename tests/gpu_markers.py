"""Where the `gpu` tests run: on CUDA, or on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
