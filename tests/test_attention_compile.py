"""geo_attention composes with PyTorch's tracers: torch.compile(fullgraph=True) of a
forward and backward through the PyTorch backend equals eager; torch.func.grad works on both
backends; the Triton path (registered ops with fake implementations) traces under FakeTensorMode
with the right shapes and dtypes without launching a kernel; its dropout seed is a device tensor.

torch.compile on CPU takes tens of seconds, so only two tests compile: forward and backward
through aot_eager, and inference (the branch that leaves fully masked rows to SDPA) through inductor.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from geocap.kernels import geo_attention
from geocap.kernels import triton_attention as ta
from helpers import differentiable, random_inputs

ARGS = ("q", "k", "v", "boxes", "wg_weight", "wg_bias", "attention_mask")
GRADS = ("q", "k", "v", "wg_weight", "wg_bias")


def _inputs(seed=0):
    return differentiable(random_inputs(2, 2, 7, 16, torch.float32, "cpu", seed=seed))


def _loss(backend, q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    out = geo_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask, backend=backend).out
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def _grads(fn, x):
    loss = fn(*[x[n] for n in ARGS])
    return [loss.detach()] + list(torch.autograd.grad(loss, [x[n] for n in GRADS]))


def test_torch_backend_compiles_fullgraph_forward_and_backward_equal_to_eager():
    torch._dynamo.reset()
    x = _inputs()
    compiled = torch.compile(lambda *a: _loss("torch", *a), fullgraph=True, backend="aot_eager")
    eager = _grads(lambda *a: _loss("torch", *a), x)
    traced = _grads(compiled, x)
    for name, a, b in zip(("loss",) + GRADS, traced, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the compiled function is not a constant: other inputs, other results (no recompilation
    # for equal shapes: fullgraph would raise on a graph break)
    y = _inputs(seed=1)
    torch.testing.assert_close(_grads(compiled, y)[0], _grads(lambda *a: _loss("torch", *a), y)[0])


def test_torch_backend_inference_compiles_with_inductor_and_keeps_padded_images_zero():
    """Without gradients the PyTorch path gives masked keys -inf and leaves a row without valid
    keys to SDPA; inductor's lowering of it must give such a row 0 too, as eager does."""
    torch._dynamo.reset()
    x = random_inputs(2, 2, 7, 16, torch.float32, "cpu", seed=3)
    x["attention_mask"][1] = False

    def forward(*a):
        return geo_attention(*a, backend="torch").out

    with torch.no_grad():
        eager = forward(*[x[n] for n in ARGS])
        compiled = torch.compile(forward, fullgraph=True)(*[x[n] for n in ARGS])
    assert (compiled[1] == 0).all()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_func_grad_equals_autograd(backend):
    x = _inputs()

    def loss_of_weights(wg_weight, wg_bias):
        return _loss(backend, x["q"].detach(), x["k"].detach(), x["v"].detach(), x["boxes"], wg_weight, wg_bias,
                     x["attention_mask"])

    d_weight, d_bias = torch.func.grad(loss_of_weights, argnums=(0, 1))(x["wg_weight"].detach(), x["wg_bias"].detach())
    expected = _grads(lambda *a: _loss(backend, *a), x)
    torch.testing.assert_close(d_weight, expected[4])
    torch.testing.assert_close(d_bias, expected[5])


class _NoLaunch:
    """Stands in for a Triton kernel: fails if anything launches it."""

    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched while tracing with fake tensors")


@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float16, 0.2)])
def test_triton_path_traces_under_fake_tensors_without_running(monkeypatch, dtype, dropout_p):
    for kernel in ("_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"):
        monkeypatch.setattr(ta, kernel, _NoLaunch())
    real = random_inputs(2, 3, 9, 16, dtype, "cpu")
    with FakeTensorMode() as mode:
        x = {n: (mode.from_tensor(t) if torch.is_tensor(t) else t) for n, t in real.items()}
        for n in GRADS:
            x[n].requires_grad_()
        result = geo_attention(*[x[n] for n in ARGS], backend="triton", dropout_p=dropout_p, return_entropy=True,
                               return_probs=True)
        assert isinstance(result.out, FakeTensor)
        assert result.out.shape == (2, 3, 9, 16) and result.out.dtype == dtype
        assert result.entropy.shape == (2, 3, 9) and result.entropy.dtype == torch.float32
        assert result.probs.shape == (2, 3, 9, 9) and result.probs.dtype == torch.float32
        grads = torch.autograd.grad(result.out.float().sum(), [x[n] for n in GRADS])
        for n, g in zip(GRADS, grads):
            assert g.shape == x[n].shape and g.dtype == x[n].dtype, n


def test_dropout_seed_is_a_device_tensor_read_by_the_kernels():
    """The seed never visits the host: an int64 [1] tensor on the inputs' device, drawn from
    torch's generator (reproducible under torch.manual_seed), that the kernels load. Under a
    captured CUDA graph the draw is part of the graph (not verifiable on this CPU machine)."""
    torch.manual_seed(3)
    seed = ta.draw_dropout_seed("cpu")
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device.type == "cpu"
    torch.manual_seed(3)
    assert torch.equal(ta.draw_dropout_seed("cpu"), seed)
    keep = ta.dropout_keep_mask(1, 1, 16, 16, 0.5, seed, "cpu")
    other = ta.dropout_keep_mask(1, 1, 16, 16, 0.5, seed + 1, "cpu")
    assert torch.equal(keep, ta.dropout_keep_mask(1, 1, 16, 16, 0.5, int(seed), "cpu"))
    assert not torch.equal(keep, other)


def test_a_fake_tensor_trace_never_leaves_fake_constants_for_real_calls():
    """The frequencies are cached per (dtype, device); a first call under FakeTensorMode must not
    cache a FakeTensor (a later real call would get it back, with no data). float64 on the
    torch path, whose cache the other tests of this process may not have filled yet: cleared first."""
    from geocap.kernels import geometry

    geometry._frequencies.cache_clear()
    geometry._pair_constants.cache_clear()
    real = random_inputs(1, 2, 5, 8, torch.float64, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = {n: (mode.from_tensor(t) if torch.is_tensor(t) else t) for n, t in real.items()}
        traced = geo_attention(*[x[n] for n in ARGS], backend="torch").out
        assert isinstance(traced, FakeTensor) and traced.shape == (1, 2, 5, 8)
    got = geo_attention(*[real[n] for n in ARGS], backend="torch").out
    assert not isinstance(got, FakeTensor)
    assert not any(isinstance(c, FakeTensor) for c in geometry.pair_constants(torch.float64, "cpu"))
    assert not isinstance(geometry.geometry_frequencies(dtype=torch.float64), FakeTensor)
    geometry._frequencies.cache_clear()
    geometry._pair_constants.cache_clear()
    expected = geo_attention(*[real[n] for n in ARGS], backend="torch").out
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
