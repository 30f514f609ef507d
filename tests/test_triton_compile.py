"""The attention kernels compile for a real GPU target (sm_90), not only under the interpreter.

The interpreter accepts constructs the compiler rejects (non-constexpr globals, dtype mixes);
this compiles the most demanding variant of each kernel ahead of time in a subprocess with
TRITON_INTERPRET unset, which needs no GPU. On a GPU machine the other tests compile them for
real, so this is skipped there."""
import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import json, sys
from geocap.kernels.compile_check import compile_variant
for kind in ("fwd", "bwd_kv", "bwd_q"):
    print(json.dumps(compile_variant(kind, sys.argv[1], 64, geo=True, mask=True, causal=False, dropout=True)))
print(json.dumps(compile_variant("fwd", sys.argv[1], 64, geo=True, mask=True, causal=False, dropout=False, probs=True)))
for kind in ("fwd", "bwd_kv", "bwd_q"):
    print(json.dumps(compile_variant(kind, sys.argv[1], 64, geo=True, mask=True, causal=False, dropout=True,
                                     signed=True)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels for real")
@pytest.mark.parametrize("dtype", ["float16"])
def test_attention_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT, dtype], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"].split("/")[0] for r in reports] == ["fwd", "bwd_kv", "bwd_q", "fwd", "fwd", "bwd_kv", "bwd_q"]
    assert [r["variant"].endswith("/signed") for r in reports] == [False] * 4 + [True] * 3
    for r in reports:
        assert r["registers"] is not None and r["registers"] <= 255, r
