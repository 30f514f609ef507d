"""Ahead-of-time compilation of the attention kernels for a GPU target, without a GPU.

The Triton interpreter accepts constructs the compiler rejects (non-constexpr globals, some
dtype mixes, shapes); compiling each kernel variant for sm_90 (H100/H200) catches those on any
machine, and ``ptxas -v`` reports registers and spills per variant. Run as
``python -m geocap.kernels.compile_check`` with TRITON_INTERPRET unset; prints one JSON line per
variant.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(fn, pointers: dict, floats: set, const: dict):
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(kind: str, dtype: str, head_dim: int, geo: bool, mask: bool, causal: bool, dropout: bool,
                    arch: int = 90, blocks=None, probs: bool = False, signed: bool = False):
    """Compile one variant; returns a dict with its name, registers and spills (from ptxas -v).
    ``blocks`` = (BM, BN, num_warps) overrides the launch heuristic (for tuning); ``signed`` the
    signed box embedding (``embedding="signed"``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_attention as ta

    t = TORCH_TO_TRITON[dtype]
    bm, bn, warps = blocks or ta.gpu_block_config(head_dim, backward=kind != "fwd", fp32=dtype == "float32")
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BM=bm, BN=bn,
                  HAS_GEO=geo, HAS_MASK=mask, CAUSAL=causal, DROPOUT=dropout,
                  DOT_PRECISION="ieee" if dtype == "float32" else "tf32", F32=False, SIGNED=signed)
    floats = {"sm_scale", "dropout_p"}
    if kind == "fwd":
        fn = ta._fwd_kernel
        const = dict(common, RETURN_ENT=True, RETURN_PROBS=probs)
        pointers = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Out": f"*{t}"}
        fp32_ptrs = ("Lse", "Ent", "Probs", "Boxes", "WgW", "WgB", "Freq")
    elif kind == "bwd_kv":
        fn = ta._bwd_kv_kernel
        const = common
        pointers = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "DO": f"*{t}", "DK": f"*{t}", "DV": f"*{t}"}
        fp32_ptrs = ("Lse", "Delta", "DW", "DB", "Boxes", "WgW", "WgB", "Freq")
    else:
        fn = ta._bwd_q_kernel
        const = common
        pointers = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "DO": f"*{t}", "DQ": f"*{t}"}
        fp32_ptrs = ("Lse", "Delta", "Boxes", "WgW", "WgB", "Freq")
    pointers.update({p: "*fp32" for p in fp32_ptrs})
    pointers["Mask"] = "*i8"
    pointers["Seed"] = "*i64"                   # the dropout seed is read from device memory
    sig = _signature(fn, pointers, floats, const)
    compiled = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    name = f"{kind}/{dtype}/d{head_dim}" + "".join(
        f"/{flag}" for flag, on in (("geo", geo), ("mask", mask), ("causal", causal), ("dropout", dropout),
                                     ("probs", probs), ("signed", signed)) if on)
    info = {"variant": name, "BM": bm, "BN": bn, "num_warps": warps, "shared_bytes": compiled.metadata.shared}
    info.update(_ptxas_usage(compiled.asm["ptx"], arch))
    return info


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the kernel in ``ptx`` as ptxas reports them."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # newer Triton emits PTX versions only the bundled "ptxas-blackwell" reads
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bin_dir, n))), "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None}


def variants(quick: bool = False):
    dtypes = ["float16"] if quick else ["float16", "bfloat16", "float32"]
    dims = [64] if quick else [32, 64, 128]
    for kind, dtype, d in itertools.product(["fwd", "bwd_kv", "bwd_q"], dtypes, dims):
        yield dict(kind=kind, dtype=dtype, head_dim=d, geo=True, mask=True, causal=False, dropout=not quick)
    for kind in ["fwd", "bwd_kv", "bwd_q"]:
        yield dict(kind=kind, dtype="float16", head_dim=64, geo=False, mask=True, causal=True, dropout=False)
    yield dict(kind="fwd", dtype="float16", head_dim=64, geo=True, mask=True, causal=False, dropout=False, probs=True)
    for kind in ["fwd", "bwd_kv", "bwd_q"]:
        yield dict(kind=kind, dtype="float16", head_dim=64, geo=True, mask=True, causal=False, dropout=not quick,
                   signed=True)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles for a GPU target", file=sys.stderr)
        return 2
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    for v in variants(quick):
        print(json.dumps(compile_variant(**v)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
