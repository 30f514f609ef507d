"""The ORT captioner (geocap.model) on a tiny configuration: shapes, masking, causality,
cached decoding, gradients, the geometry ablation, ORT's extra skip and LayerNorm, backends,
the config round trip and attention recording."""
from __future__ import annotations

import json

import pytest
import torch

from geocap.kernels import geo_attention
from geocap.model import AttentionRecord, LayerNorm, Memory, ObjectRelationTransformer, ORTConfig

from helpers import random_boxes

TINY = dict(vocab_size=20, feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64)


def make_model(seed=0, **overrides) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(**{**TINY, **overrides}))


def make_inputs(batch=3, n=6, t=7, seed=1, device="cpu"):
    """features [B, N, 16], boxes [B, N, 4], box_mask [B, N] (rows with 6, 4, 1 real boxes),
    tokens [B, T] starting with <bos>."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, TINY["feature_dim"], generator=g)
    boxes = random_boxes(batch, n, generator=g)
    real = torch.tensor([n, 4, 1, 3][:batch])
    box_mask = torch.arange(n)[None, :] < real[:, None]
    features = features.masked_fill(~box_mask[..., None], 0.0)
    boxes = boxes.masked_fill(~box_mask[..., None], 0.0)
    tokens = torch.randint(3, TINY["vocab_size"], (batch, t), generator=g)
    tokens[:, 0] = 1
    return [x.to(device) for x in (features, boxes, box_mask, tokens)]


def test_shapes_and_normalised_log_probs():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs()
    log_probs = model(features, boxes, box_mask, tokens)
    assert log_probs.shape == (3, 7, 20)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)
    memory = model.encode(features, boxes, box_mask)
    assert memory.states.shape == (3, 6, 32)
    assert len(memory.keys) == len(memory.values) == 2 and memory.keys[0].shape == (3, 2, 6, 16)


def test_padded_slots_do_not_change_outputs():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs()
    ref = model(features, boxes, box_mask, tokens)
    pad = ~box_mask
    junk_features = features.clone()
    junk_features[pad] = torch.randn(int(pad.sum()), TINY["feature_dim"]) * 100
    junk_boxes = boxes.clone()
    junk_boxes[pad] = torch.tensor([0.9, 0.8, 0.1, 0.05])  # inverted, would fail validation if real
    junk_features[1, 5, 0] = float("nan")
    out = model(junk_features, junk_boxes, box_mask, tokens)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # sanity: changing a real box does change the output
    moved = boxes.clone()
    moved[1, 0] = torch.tensor([0.0, 0.0, 0.9, 0.9])
    assert not torch.allclose(model(features, moved, box_mask, tokens), ref)


def test_causality():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs(t=8)
    ref = model(features, boxes, box_mask, tokens)
    for t in (0, 3, 6):
        changed = tokens.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 5) % 17 + 3
        out = model(features, boxes, box_mask, changed)
        torch.testing.assert_close(out[:, :t + 1], ref[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


def test_cached_decode_matches_teacher_forcing():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs(t=8)
    with torch.no_grad():
        ref = model(features, boxes, box_mask, tokens)
        memory = model.encode(features, boxes, box_mask)
        cache = None
        for t in range(tokens.shape[1]):  # one token at a time ([B] form)
            step, cache = model.decode_step(memory, tokens[:, t], cache)
            assert cache.length == t + 1
            torch.testing.assert_close(step, ref[:, t], atol=1e-5, rtol=0)
        # the prefix form ([B, t]) runs only the tokens beyond the cache
        _, cache = model.decode_step(memory, tokens[:, :3])
        step, cache = model.decode_step(memory, tokens[:, :5], cache)
        assert cache.length == 5
        torch.testing.assert_close(step, ref[:, 4], atol=1e-5, rtol=0)


def test_memory_and_cache_expand_for_beams():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs(t=4)
    with torch.no_grad():
        ref = model(features, boxes, box_mask, tokens)
        memory = model.encode(features, boxes, box_mask).repeat_interleave(2)
        assert isinstance(memory, Memory) and memory.batch_size == 6
        beams = tokens.repeat_interleave(2, 0)
        _, cache = model.decode_step(memory, beams[:, :2])
        # swap the two beams of every image: still the same per-image prefix, so the same output
        order = torch.tensor([1, 0, 3, 2, 5, 4])
        memory, cache = memory.index_select(order), cache.index_select(order)
        step, cache = model.decode_step(memory, beams[:, :3], cache)
    torch.testing.assert_close(step, ref[:, 2].repeat_interleave(2, 0), atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter():
    model = make_model(dropout=0.1).train()
    features, boxes, box_mask, tokens = make_inputs()
    log_probs = model(features, boxes, box_mask, tokens)
    targets = torch.roll(tokens, -1, dims=1)
    loss = torch.nn.functional.nll_loss(log_probs.reshape(-1, 20), targets.reshape(-1))
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert any(name.endswith("wg_weight") for name in names) and any(name.endswith("wg_bias") for name in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_geometry_ablation_runs_and_differs():
    geo = make_model().eval()
    plain = make_model(geometry=False).eval()
    missing, unexpected = plain.load_state_dict(geo.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == sorted(
        f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("wg_weight", "wg_bias"))
    assert not any(name.endswith(("wg_weight", "wg_bias")) for name, _ in plain.named_parameters())
    features, boxes, box_mask, tokens = make_inputs()
    a = geo(features, boxes, box_mask, tokens)
    b = plain(features, boxes, box_mask, tokens)
    torch.testing.assert_close(b.exp().sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)
    assert (a - b).abs().max() > 1e-3
    # without geometry the boxes do not matter at all
    torch.testing.assert_close(plain(features, random_boxes(3, 6), box_mask, tokens), b, atol=0, rtol=0)


@pytest.mark.parametrize("geometry", [True, False])
def test_legacy_extra_skip_adds_the_value_input(geometry):
    model = make_model(legacy_extra_skip=True, geometry=geometry).eval()
    features, boxes, box_mask, _ = make_inputs()
    layer = model.encoder.layers[0]
    attn = layer.self_attn
    x = model.feature_embed(features)
    # manual encoder layer, ORT's op order: value input = norm(x); out = linears[3](attn) + value
    h = layer.attn_norm(x)
    q, k, v = (attn.split_heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if geometry:
        heads = geo_attention(q, k, v, boxes, attn.wg_weight, attn.wg_bias, box_mask).out
    else:
        from geocap.kernels import attention
        heads = attention(q, k, v, box_mask).out
    attended = attn.out_proj(attn.merge_heads(heads))
    y = x + (h + attended)
    y = y + layer.feed_forward(layer.ff_norm(y))
    out, _ = layer(x, boxes, box_mask)
    torch.testing.assert_close(out, y, atol=1e-6, rtol=1e-6)
    # and exactly the value input is what the flag adds to the attention sublayer
    with_skip, _ = attn(h, boxes, box_mask)
    attn.legacy_extra_skip = False
    without, _ = attn(h, boxes, box_mask)
    torch.testing.assert_close(with_skip - without, h, atol=1e-6, rtol=1e-6)


def test_torch_and_triton_backends_agree(device):
    model = make_model().to(device).eval()
    features, boxes, box_mask, tokens = make_inputs(batch=2, n=5, t=5, device=device)
    with torch.no_grad():
        a = model(features, boxes, box_mask, tokens, backend="torch")
        b = model(features, boxes, box_mask, tokens, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    model.backend = "triton"  # the attribute is the default of every call
    with torch.no_grad():
        memory = model.encode(features, boxes, box_mask)
        step, _ = model.decode_step(memory, tokens[:, :3])
    torch.testing.assert_close(step, a[:, 2], atol=1e-4, rtol=0)


def test_ort_layer_norm_formula():
    torch.manual_seed(0)
    norm = LayerNorm(12)
    with torch.no_grad():
        norm.a_2.uniform_(0.5, 1.5)
        norm.b_2.normal_()
    x = torch.randn(4, 3, 12, dtype=torch.float64) * 3 + 1
    norm = norm.double()
    mean = x.sum(-1, keepdim=True) / 12
    std = (((x - mean) ** 2).sum(-1, keepdim=True) / 11).sqrt()  # unbiased: n - 1
    expected = norm.a_2 * (x - mean) / (std + 1e-6) + norm.b_2
    torch.testing.assert_close(norm(x), expected, atol=1e-12, rtol=1e-12)
    # differs from nn.LayerNorm (biased variance, eps under the root)
    ref = torch.nn.functional.layer_norm(x, (12,), norm.a_2, norm.b_2, eps=1e-6)
    assert (norm(x) - ref).abs().max() > 1e-3


def test_config_round_trip_and_validation():
    cfg = ORTConfig(**TINY, dropout=0.25, geometry=False, legacy_extra_skip=True, max_len=40)
    again = ORTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert ORTConfig.from_dict({"vocab_size": 9}) == ORTConfig(vocab_size=9)
    with pytest.raises(ValueError, match="bogus"):
        ORTConfig.from_dict({**TINY, "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        ORTConfig(**{**TINY, "heads": 3})
    with pytest.raises(ValueError, match="dropout"):
        ORTConfig(**TINY, dropout=1.0)
    with pytest.raises(ValueError, match="eos_id"):
        ORTConfig(**TINY, eos_id=20)
    model = ObjectRelationTransformer(again)
    with pytest.raises(ValueError, match="max_len"):
        model.embed_tokens(torch.zeros(1, 41, dtype=torch.long))


def test_record_returns_attention_maps():
    model = make_model().eval()
    features, boxes, box_mask, tokens = make_inputs()
    plain = model(features, boxes, box_mask, tokens)
    log_probs, rec = model(features, boxes, box_mask, tokens, record=True)
    torch.testing.assert_close(log_probs, plain, atol=0, rtol=0)
    assert isinstance(rec, AttentionRecord)
    b, n, t, h = 3, 6, 7, 2
    shapes = {"encoder": (n, n), "decoder": (t, t), "cross": (t, n)}
    for kind, (nq, nk) in shapes.items():
        probs, entropy = getattr(rec, f"{kind}_probs"), getattr(rec, f"{kind}_entropy")
        assert len(probs) == len(entropy) == 2
        for p, e in zip(probs, entropy):
            assert p.shape == (b, h, nq, nk) and e.shape == (b, h, nq)
            assert not p.requires_grad
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            torch.testing.assert_close(e, ent, atol=1e-5, rtol=1e-5)
    key_mask = box_mask[:, None, None, :]
    for p in rec.encoder_probs:
        real_rows = p[box_mask[:, None, :, None].expand_as(p)].view(-1, n)
        torch.testing.assert_close(real_rows.sum(-1), torch.ones(len(real_rows)), atol=1e-5, rtol=0)
        assert (p.masked_select(~key_mask.expand_as(p)) == 0).all()
    for p in rec.cross_probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(b, h, t), atol=1e-5, rtol=0)
        assert (p.masked_select(~key_mask.expand_as(p)) == 0).all()
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for p in rec.decoder_probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(b, h, t), atol=1e-5, rtol=0)
        assert (p[..., future] == 0).all()


def test_init_is_xavier_uniform_with_ort_geometry_rows():
    model = make_model(d_model=64, heads=4, d_ff=128)
    for name, p in model.named_parameters():
        if name.endswith("wg_weight"):
            assert p.shape == (4, 64)
            bound = (6.0 / (64 + 1)) ** 0.5  # ORT's per-head Linear(64 -> 1), xavier per row
        elif p.dim() == 2:
            bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
        else:
            continue
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.8 * bound, name  # spread over the whole range, not a default init
    ln = model.encoder.layers[0].attn_norm
    assert (ln.a_2 == 1).all() and (ln.b_2 == 0).all()


def test_feed_forward_is_linear_relu_linear():
    from geocap.model.layers import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(8, 16, dropout=0.0).eval()
    x = torch.randn(3, 5, 8)
    expected = torch.relu(x @ ff.w_1.weight.T + ff.w_1.bias) @ ff.w_2.weight.T + ff.w_2.bias
    torch.testing.assert_close(ff(x), expected)
