"""Host synchronisations and aten launches per geometry-attention call, counted with a
TorchDispatchMode (kernels/op_count.py), on both backends (the Triton one under the
interpreter: its launches are counted, the interpreter's own host copies are not).

Inside the model, training and dumps geometry attention runs with value checks off (the model
checks boxes once where they enter); there a forward and a backward never synchronise, and the
Triton forward launches at most 4 aten kernels besides its own.
"""
import pytest
import torch

from geocap.kernels import geo_attention, value_checks
from geocap.kernels.op_count import count_ops, triton_launch
from helpers import differentiable, random_inputs

TRITON_FORWARD_ATEN_KERNELS = 4


def _call(x, backend, **kw):
    return geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], x["attention_mask"],
                         backend=backend, **kw)


def _counted_forward_backward(backend, dtype=torch.float32, dropout_p=0.0):
    x = differentiable(random_inputs(1, 2, 4, 16, dtype, "cpu"))
    with value_checks(False):
        _call(x, backend, dropout_p=dropout_p)                               # warm caches (frequencies)
        with count_ops() as forward:
            out = _call(x, backend, dropout_p=dropout_p).out
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
        with count_ops() as backward:
            out.backward(grad)
    return forward, backward


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_no_host_sync_in_forward_and_backward(backend, dropout_p):
    forward, backward = _counted_forward_backward(backend, dropout_p=dropout_p)
    assert forward.syncs == 0, forward.summary()
    assert backward.syncs == 0, backward.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_launches_few_aten_kernels(dtype):
    forward, backward = _counted_forward_backward("triton", dtype)
    assert forward.triton_launches == 1 and forward.custom_ops == 1, forward.summary()
    assert forward.kernels <= TRITON_FORWARD_ATEN_KERNELS, forward.summary()
    assert backward.triton_launches == 2, backward.summary()
    # delta (mul, sum), the two partial-sum reductions; at fp16 also dO to float32 and back (the
    # forward stores its output in float32 for delta) and dW_g, db_g to the weights' fp16
    assert backward.kernels <= (4 if dtype == torch.float32 else 8), backward.summary()


def test_torch_forward_stays_compact():
    """The PyTorch path's forward at B=1, N=4 (measured 21 aten kernels without gradients, 28 with;
    85 at commit e14c9ee): a bound that catches a regression to per-channel or per-head loops."""
    forward, _ = _counted_forward_backward("torch")
    assert forward.kernels <= 40, forward.summary()


def test_counter_sees_syncs_and_ignores_launch_internals():
    """The counter is not blind: ``.item()`` and ``bool()`` count as syncs, views and allocations
    are told apart from kernels, and aten calls inside a marked launch are not counted."""
    t = torch.ones(3)
    with count_ops() as c:
        t[0].item()
        bool(t.sum() > 0)
        t.view(3, 1)
        torch.empty(2)
        with triton_launch():
            t + 1
    assert c.syncs == 2 and c.views == 2 and c.allocations == 1 and c.triton_launches == 1, c.summary()
    assert c.kernel_names == {"sum": 1, "gt": 1}, c.summary()


def test_value_checks_cost_one_fused_pass():
    """With checks on, a public call adds one fused box check (a handful of kernels), not ~22."""
    x = random_inputs(1, 2, 4, 16, torch.float32, "cpu")
    with value_checks(False), count_ops() as off:
        _call(x, "triton")
    with count_ops() as on:
        _call(x, "triton")
    assert on.kernels - off.kernels <= 6, (on.summary(), off.summary())
