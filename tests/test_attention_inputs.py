"""Bad input gets a ValueError that names the argument; never a silent NaN."""
import pytest
import torch

from geocap.kernels import attention, geo_attention
from geocap.kernels._backend import resolve_backend
from helpers import random_inputs


def _geo(x, **kw):
    args = dict(x, backend="torch")
    args.update(kw)
    return geo_attention(args["q"], args["k"], args["v"], args["boxes"], args["wg_weight"], args["wg_bias"],
                         args["attention_mask"], backend=args["backend"], embedding=args["embedding"])


@pytest.fixture
def inputs():
    return random_inputs(2, 2, 6, 16, torch.float32, "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,message", [
    (lambda x: {"q": x["q"][:, :, :5]}, "same number of objects"),
    (lambda x: {"k": x["k"][..., :8]}, "k and v must have the same shape"),
    (lambda x: {"q": x["q"][0]}, r"q must have shape \[B, H, N, d\]"),
    (lambda x: {"v": x["v"].half()}, "share one dtype"),
    (lambda x: {"q": x["q"].int(), "k": x["k"].int(), "v": x["v"].int()}, "q has dtype int32"),
    (lambda x: {"q": x["q"][..., :0], "k": x["k"][..., :0], "v": x["v"][..., :0]}, "head dim d = 0"),
    (lambda x: {"k": x["k"][..., :8], "v": x["v"][..., :8]}, "must agree in batch, heads and head dim"),
    (lambda x: {"boxes": x["boxes"][:, :4]}, r"boxes must have shape \[B, N, 4\] = \(2, 6, 4\)"),
    (lambda x: {"boxes": x["boxes"][..., :3]}, r"boxes must have shape \[B, N, 4\]"),
    (lambda x: {"wg_weight": x["wg_weight"][:, :32]}, r"wg_weight must have shape \[H, 64\]"),
    (lambda x: {"wg_bias": x["wg_bias"][:1]}, r"wg_bias must have shape \[H\]"),
    (lambda x: {"attention_mask": x["attention_mask"][:, :5]}, r"attention_mask must have shape \[B, N\]"),
    (lambda x: {"attention_mask": x["attention_mask"].float()}, "attention_mask must be a bool tensor"),
    (lambda x: {"boxes": x["boxes"].to("meta")}, "boxes is on meta but q is on cpu"),
    (lambda x: {"attention_mask": x["attention_mask"].to("meta")}, "attention_mask is on meta but q is on cpu"),
    (lambda x: {"backend": "cuda"}, "backend must be one of"),
    (lambda x: {"embedding": "mirror"}, "embedding must be one of 'ort', 'signed', got 'mirror'"),
])
def test_shape_dtype_device_errors(inputs, backend, change, message):
    with pytest.raises(ValueError, match=message):
        _geo(inputs, **{"backend": backend, **change(inputs)})


@pytest.mark.parametrize("coord,value,message", [
    (2, float("nan"), "NaN or inf"), (2, float("inf"), "NaN or inf"), (2, 250.0, "normalised to"),
    (0, -0.5, "normalised to"),
])
def test_bad_box_values_name_the_box(inputs, coord, value, message):
    inputs["attention_mask"][1, 3] = True
    inputs["boxes"][1, 3, coord] = value
    with pytest.raises(ValueError, match=message + r".*boxes\[1, 3\]"):
        _geo(inputs)


def test_inverted_box(inputs):
    inputs["attention_mask"][0, 2] = True
    inputs["boxes"][0, 2] = torch.tensor([0.6, 0.1, 0.2, 0.5])
    with pytest.raises(ValueError, match=r"x2 >= x1.*boxes\[0, 2\]"):
        _geo(inputs)


def test_value_checks_can_be_switched_off_for_a_block(inputs):
    from geocap.kernels import value_checks

    inputs["attention_mask"][0, 2] = True
    inputs["boxes"][0, 2, 2] = 3.0
    with value_checks(False):
        _geo(inputs)                       # pixel-like box accepted: the caller opted out
        with pytest.raises(ValueError, match="mask must be a bool"):
            _geo(inputs, attention_mask=inputs["attention_mask"].int())   # shape/dtype checks stay
    with pytest.raises(ValueError, match="normalised"):
        _geo(inputs)


def test_padded_boxes_are_not_checked(inputs):
    inputs["attention_mask"][0, 2] = False
    inputs["boxes"][0, 2] = float("nan")
    assert torch.isfinite(_geo(inputs).out[0]).all()


def test_dropout_and_attention_errors(inputs):
    with pytest.raises(ValueError, match="dropout_p"):
        geo_attention(inputs["q"], inputs["k"], inputs["v"], inputs["boxes"], inputs["wg_weight"],
                      inputs["wg_bias"], dropout_p=1.0)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, N\] = \(2, 3\)"):
        attention(inputs["q"], inputs["k"][:, :, :3], inputs["v"][:, :, :3], inputs["attention_mask"])
    with pytest.raises(ValueError, match="agree in batch, heads and head dim"):
        attention(inputs["q"], inputs["k"][:1], inputs["v"][:1])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
