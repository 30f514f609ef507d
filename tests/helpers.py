"""Shared test helpers: random ORT inputs and flash-attention's tolerance rule.

The rule: a path's max error against the float64 reference may be at most twice the error the
eager ORT-style implementation makes at the same precision, and never needs to beat 1e-5.
The reference always runs on the *same* (already rounded) inputs upcast to float64, so errors
measure computation, not input rounding.
"""
from __future__ import annotations

import torch

from geocap.kernels.reference import reference_attention

GRAD_NAMES = ("q", "k", "v", "wg_weight", "wg_bias")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_boxes(batch, n, *, generator=None, dtype=torch.float32, device="cpu"):
    """Valid normalised (x1, y1, x2, y2) boxes ``[B, N, 4]``."""
    xy = torch.rand(batch, n, 2, generator=generator, dtype=torch.float64)
    wh = torch.rand(batch, n, 2, generator=generator, dtype=torch.float64) * (1 - xy)
    return torch.cat([xy, xy + wh], dim=-1).to(dtype=dtype, device=device)


def random_inputs(batch, heads, n, d, dtype, device, *, seed=0, masked=True, n_keys=None, geometry=True):
    """dict of q, k, v (and boxes, wg_weight, wg_bias) in ``dtype`` plus key_padding_mask."""
    g = torch.Generator().manual_seed(seed)
    nk = n if n_keys is None else n_keys
    t = {
        "q": torch.randn(batch, heads, n, d, generator=g),
        "k": torch.randn(batch, heads, nk, d, generator=g),
        "v": torch.randn(batch, heads, nk, d, generator=g),
    }
    if geometry:
        t["boxes"] = random_boxes(batch, n, generator=g)
        t["wg_weight"] = torch.randn(heads, 64, generator=g) * 0.3
        t["wg_bias"] = torch.randn(heads, generator=g) * 0.3
    out = {name: x.to(device=device, dtype=torch.float32 if name == "boxes" else dtype) for name, x in t.items()}
    mask = None
    if masked:
        mask = torch.rand(batch, nk, generator=g) > 0.3
        mask[:, 0] = True
        mask = mask.to(device)
    out["key_padding_mask"] = mask
    return out


def differentiable(inputs):
    return {k: (v.detach().clone().requires_grad_(k in GRAD_NAMES) if torch.is_tensor(v) and v.is_floating_point()
                else v) for k, v in inputs.items()}


def upcast(inputs):
    return {k: (v.detach().double().requires_grad_(k in GRAD_NAMES) if torch.is_tensor(v) and v.is_floating_point()
                else v) for k, v in inputs.items()}


def run_reference(inputs, grad_out, causal=False, dropout_keep=None, dropout_p=0.0):
    """``(out, probs, grads)`` of the eager reference on ``inputs`` (grads keyed by name; None
    when ``grad_out`` is None)."""
    out, probs = reference_attention(inputs["q"], inputs["k"], inputs["v"], inputs.get("boxes"),
                                     inputs.get("wg_weight"), inputs.get("wg_bias"), inputs["key_padding_mask"],
                                     causal=causal, dropout_keep=dropout_keep, dropout_p=dropout_p)
    return out, probs, (None if grad_out is None else grads_of(out, inputs, grad_out))


def grads_of(out, inputs, grad_out):
    names = [n for n in GRAD_NAMES if n in inputs and inputs[n].requires_grad]
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out.to(out.dtype))
    return dict(zip(names, grads))


def max_err(x, ref) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def tolerance(eager_err: float) -> float:
    return max(2.0 * eager_err, 1e-5)


def assert_within_eager_rule(name, ours, eager, ref):
    err, eager_err = max_err(ours, ref), max_err(eager, ref)
    assert err <= tolerance(eager_err), f"{name}: error {err:.3e} > 2 x eager error {eager_err:.3e} (floor 1e-5)"


def synth_data_dir(root, *, images: int = 40, seed: int = 0, feature_dim: int = 16) -> str:
    """A data dir as ``geocap synth`` + ``geocap prepro captions`` lay it out (features.h5,
    ground_truth.json, caps/ with every word kept), at ``root``; returns its path."""
    from geocap.cli import main as cli_main
    from geocap.data.synth import generate_synthetic

    generate_synthetic(root, images=images, seed=seed, feature_dim=feature_dim, progress=False)
    assert cli_main(["prepro", "captions", "--karpathy", str(root / "dataset_coco.json"), "--out",
                     str(root / "caps"), "--min-count", "1"]) == 0
    return str(root)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_train_worker(rank, world, port, config_dict, out_dir):
    """``torch.multiprocessing`` entry: rank ``rank`` of ``world`` trains ``TrainConfig(**config_dict)``
    over gloo and saves its final state dict to ``out_dir/rank{rank}.pt``."""
    import os

    from geocap.train import TrainConfig, train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(TrainConfig(**config_dict))
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
