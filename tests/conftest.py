"""Test-wide set-up.

Without a GPU the Triton kernels run under the Triton CPU interpreter, which must be switched
on before triton is first imported; with a GPU they run compiled, from the same test files.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# import triton now, in the mode chosen above: a test that later flips TRITON_INTERPRET (to check
# the error without the interpreter) must not be the first to import it
import triton  # noqa: E402,F401

import pytest  # noqa: E402

from helpers import DEVICE  # noqa: E402

# hypothesis: CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples on every run, so
# a red CI is reproducible and never a new random draw; local runs keep exploring new examples
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

if not torch.cuda.is_available():
    # the suite's tensors are tiny: extra intra-op threads only add synchronisation, and on a
    # shared 2-core machine they made tests up to 20x slower
    torch.set_num_threads(1)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
