"""pytest's setup for both test files.

The hypothesis profile "ci" (python -m pytest --hypothesis-profile=ci) draws the same examples on
every run, so that a CI run can be repeated exactly; without it, each run draws new examples
(--hypothesis-seed=N repeats one).

DEVICES parametrizes the tests that run on every device present: the CPU, and CUDA where there is
a GPU (elsewhere those cases are skipped, and the summary line counts them). TF32 stays at torch's
defaults (off for matmuls, on for cuDNN's convolutions): the tests that compare float32 numbers do
so without a convolution in float32, or in float64, where TF32 does not apply.
"""

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device here")),
]
