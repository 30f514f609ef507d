"""The ORT captioner (geocap.model) on a tiny configuration: shapes, masking, causality,
cached decoding, gradients, the geometry ablation, ORT's extra skip and LayerNorm, backends,
the config round trip and attention recording."""
from __future__ import annotations

import json

import pytest
import torch

from geocap.kernels import geo_attention
from geocap.model import AttentionMaps, LayerNorm, Memory, ObjectRelationTransformer, ORTConfig

from helpers import random_boxes

TINY = dict(vocab_size=20, feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64)


def make_model(seed=0, **overrides) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(**{**TINY, **overrides}))


def make_inputs(batch=3, n=6, t=7, seed=1, device="cpu"):
    """features [B, N, 16], boxes [B, N, 4], attention_mask [B, N] (rows with 6, 4, 1 real boxes),
    tokens [B, T] starting with <bos>."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, TINY["feature_dim"], generator=g)
    boxes = random_boxes(batch, n, generator=g)
    real = torch.tensor([n, 4, 1, 3][:batch])
    attention_mask = torch.arange(n)[None, :] < real[:, None]
    features = features.masked_fill(~attention_mask[..., None], 0.0)
    boxes = boxes.masked_fill(~attention_mask[..., None], 0.0)
    tokens = torch.randint(3, TINY["vocab_size"], (batch, t), generator=g)
    tokens[:, 0] = 1
    return [x.to(device) for x in (features, boxes, attention_mask, tokens)]


def test_shapes_and_normalised_log_probs():
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs()
    log_probs = model(features, boxes, attention_mask, tokens)
    assert log_probs.shape == (3, 7, 20)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)
    memory = model.encode(features, boxes, attention_mask)
    assert memory.states.shape == (3, 6, 32)
    assert len(memory.keys) == len(memory.values) == 2 and memory.keys[0].shape == (3, 2, 6, 16)


def test_padded_slots_do_not_change_outputs():
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs()
    ref = model(features, boxes, attention_mask, tokens)
    pad = ~attention_mask
    junk_features = features.clone()
    junk_features[pad] = torch.randn(int(pad.sum()), TINY["feature_dim"]) * 100
    junk_boxes = boxes.clone()
    junk_boxes[pad] = torch.tensor([0.9, 0.8, 0.1, 0.05])  # inverted, would fail validation if real
    junk_features[1, 5, 0] = float("nan")
    out = model(junk_features, junk_boxes, attention_mask, tokens)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # sanity: changing a real box does change the output
    moved = boxes.clone()
    moved[1, 0] = torch.tensor([0.0, 0.0, 0.9, 0.9])
    assert not torch.allclose(model(features, moved, attention_mask, tokens), ref)


def test_causality():
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs(t=8)
    ref = model(features, boxes, attention_mask, tokens)
    for t in (0, 3, 6):
        changed = tokens.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 5) % 17 + 3
        out = model(features, boxes, attention_mask, changed)
        torch.testing.assert_close(out[:, :t + 1], ref[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


def test_cached_decode_matches_teacher_forcing():
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs(t=8)
    with torch.no_grad():
        ref = model(features, boxes, attention_mask, tokens)
        memory = model.encode(features, boxes, attention_mask)
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
    features, boxes, attention_mask, tokens = make_inputs(t=4)
    with torch.no_grad():
        ref = model(features, boxes, attention_mask, tokens)
        memory = model.encode(features, boxes, attention_mask).repeat_interleave(2)
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
    features, boxes, attention_mask, tokens = make_inputs()
    log_probs = model(features, boxes, attention_mask, tokens)
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
    features, boxes, attention_mask, tokens = make_inputs()
    a = geo(features, boxes, attention_mask, tokens)
    b = plain(features, boxes, attention_mask, tokens)
    torch.testing.assert_close(b.exp().sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)
    assert (a - b).abs().max() > 1e-3
    # without geometry the boxes do not matter at all
    torch.testing.assert_close(plain(features, random_boxes(3, 6), attention_mask, tokens), b, atol=0, rtol=0)


def test_signed_embedding_reaches_the_encoder_attention():
    """config.embedding is what every encoder layer's geo_attention computes with: the signed model
    (same weights: the option adds none) equals geo_attention(embedding="signed") and tells a
    layout from its mirror image, where the ORT model cannot."""
    ort, signed = make_model().eval(), make_model(embedding="signed").eval()
    assert signed.state_dict().keys() == ort.state_dict().keys()
    signed.load_state_dict(ort.state_dict())
    assert [layer.self_attn.embedding for layer in signed.encoder.layers] == ["signed", "signed"]
    features, boxes, attention_mask, tokens = make_inputs()
    layer = signed.encoder.layers[0]
    attn = layer.self_attn
    h = layer.attn_norm(signed.feature_embed(features))
    q, k, v = (attn.split_heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    heads = geo_attention(q, k, v, boxes, attn.wg_weight, attn.wg_bias, attention_mask, embedding="signed").out
    torch.testing.assert_close(attn(h, boxes, attention_mask)[0], attn.out_proj(attn.merge_heads(heads)),
                               atol=1e-6, rtol=0)
    mirrored = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
    mirrored = mirrored.masked_fill(~attention_mask[..., None], 0.0)
    torch.testing.assert_close(ort(features, mirrored, attention_mask, tokens),
                               ort(features, boxes, attention_mask, tokens), atol=1e-5, rtol=0)
    flipped = signed(features, mirrored, attention_mask, tokens) - signed(features, boxes, attention_mask, tokens)
    assert flipped.abs().max() > 1e-3


@pytest.mark.parametrize("geometry", [True, False])
def test_legacy_extra_skip_adds_the_value_input(geometry):
    model = make_model(legacy_extra_skip=True, geometry=geometry).eval()
    features, boxes, attention_mask, _ = make_inputs()
    layer = model.encoder.layers[0]
    attn = layer.self_attn
    x = model.feature_embed(features)
    # manual encoder layer, ORT's op order: value input = norm(x); out = linears[3](heads + value)
    h = layer.attn_norm(x)
    q, k, v = (attn.split_heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if geometry:
        heads = geo_attention(q, k, v, boxes, attn.wg_weight, attn.wg_bias, attention_mask).out
    else:
        from geocap.kernels import attention
        heads = attention(q, k, v, attention_mask).out
    attended = attn.out_proj(attn.merge_heads(heads) + h)
    y = x + attended
    y = y + layer.feed_forward(layer.ff_norm(y))
    out, _ = layer(x, boxes, attention_mask)
    torch.testing.assert_close(out, y, atol=1e-6, rtol=1e-6)
    # and exactly the value input is what the flag adds to the attention sublayer
    with_skip, _ = attn(h, boxes, attention_mask)
    attn.legacy_extra_skip = False
    without, _ = attn(h, boxes, attention_mask)
    torch.testing.assert_close(with_skip - without, h @ attn.out_proj.weight.T, atol=1e-6, rtol=1e-6)


def test_torch_and_triton_backends_agree(device):
    model = make_model().to(device).eval()
    features, boxes, attention_mask, tokens = make_inputs(batch=2, n=5, t=5, device=device)
    with torch.no_grad():
        a = model(features, boxes, attention_mask, tokens, backend="torch")
        b = model(features, boxes, attention_mask, tokens, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    model.backend = "triton"  # the attribute is the default of every call
    with torch.no_grad():
        memory = model.encode(features, boxes, attention_mask)
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
    cfg = ORTConfig(**TINY, dropout=0.25, geometry=False, legacy_extra_skip=True, embedding="signed", max_len=40)
    again = ORTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert ORTConfig.from_dict({"vocab_size": 9}) == ORTConfig(vocab_size=9)
    assert ORTConfig.from_dict({"vocab_size": 9}).embedding == "ort"        # a config saved before the field
    with pytest.raises(ValueError, match="ORTConfig.embedding must be one of 'ort', 'signed', got 'abs'"):
        ORTConfig(**TINY, embedding="abs")
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
    features, boxes, attention_mask, tokens = make_inputs()
    plain = model(features, boxes, attention_mask, tokens)
    log_probs, rec = model(features, boxes, attention_mask, tokens, return_attention=True)
    torch.testing.assert_close(log_probs, plain, atol=0, rtol=0)
    assert isinstance(rec, AttentionMaps)
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
    key_mask = attention_mask[:, None, None, :]
    for p in rec.encoder_probs:
        real_rows = p[attention_mask[:, None, :, None].expand_as(p)].view(-1, n)
        torch.testing.assert_close(real_rows.sum(-1), torch.ones(len(real_rows)), atol=1e-5, rtol=0)
        assert (p.masked_select(~key_mask.expand_as(p)) == 0).all()
    for p in rec.cross_probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(b, h, t), atol=1e-5, rtol=0)
        assert (p.masked_select(~key_mask.expand_as(p)) == 0).all()
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for p in rec.decoder_probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(b, h, t), atol=1e-5, rtol=0)
        assert (p[..., future] == 0).all()


def test_public_encode_and_teacher_force_record_what_forward_records():
    """encode(return_attention=True) gives the encoder's maps, teacher_force(return_attention=True) the decoder's, over
    a memory expanded to several captions per image: each equals forward(return_attention=True) of its row."""
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs()
    _, full = model(features, boxes, attention_mask, tokens, return_attention=True)
    memory = model.encode(features, boxes, attention_mask)
    assert isinstance(memory, Memory)
    memory_r, enc = model.encode(features, boxes, attention_mask, return_attention=True)
    torch.testing.assert_close(memory_r.states, memory.states, atol=0, rtol=0)
    assert isinstance(enc, AttentionMaps) and enc.decoder_probs == [] and enc.cross_probs == []
    for name in ("encoder_probs", "encoder_entropy"):
        assert len(getattr(enc, name)) == 2
        for a, b in zip(getattr(enc, name), getattr(full, name)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    rows = torch.tensor([2, 0, 2])                 # three captions: two of image 2, one of image 0
    caption_tokens = tokens[[0, 1, 2]]
    plain = model.teacher_force(memory.index_select(rows), caption_tokens)
    log_probs, dec = model.teacher_force(memory.index_select(rows), caption_tokens, return_attention=True)
    torch.testing.assert_close(log_probs, plain, atol=0, rtol=0)
    assert dec.encoder_probs == [] and len(dec.decoder_probs) == len(dec.cross_entropy) == 2
    t, n = tokens.shape[1], features.shape[1]
    for r, image in enumerate(rows.tolist()):
        _, one = model(features[image:image + 1], boxes[image:image + 1], attention_mask[image:image + 1],
                       caption_tokens[r:r + 1], return_attention=True)
        for name, shape in (("decoder_probs", (2, t, t)), ("decoder_entropy", (2, t)),
                            ("cross_probs", (2, t, n)), ("cross_entropy", (2, t))):
            for a, b in zip(getattr(dec, name), getattr(one, name)):
                assert a.shape[1:] == shape and not a.requires_grad
                torch.testing.assert_close(a[r:r + 1], b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens have 2 rows but memory has 3"):
        model.teacher_force(memory, tokens[:2], return_attention=True)


def test_teacher_force_positions_packs_the_wanted_rows():
    """positions=mask gives log_probs[mask] ([M, V], row-major) and the same gradients through it;
    a mask of the wrong shape or dtype is refused by name."""
    model = make_model().eval()
    features, boxes, attention_mask, tokens = make_inputs()
    memory = model.encode(features, boxes, attention_mask)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(tokens.shape, generator=g) < 0.6
    mask[0] = False                                    # a row with no wanted position
    full = model.teacher_force(memory, tokens)
    packed = model.teacher_force(memory, tokens, positions=mask)
    assert packed.shape == (int(mask.sum()), model.config.vocab_size)
    torch.testing.assert_close(packed, full[mask], atol=1e-6, rtol=1e-6)
    weights = torch.randn(packed.shape, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    grads_packed = torch.autograd.grad((model.teacher_force(memory, tokens, positions=mask) * weights).sum(), params,
                                       allow_unused=True, retain_graph=True)
    grads_full = torch.autograd.grad((model.teacher_force(memory, tokens)[mask] * weights).sum(), params,
                                     allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads_packed, grads_full):
        if b is not None:  # the packed decoder sums in another order: float32 rounding of the largest entry
            err = (a - b).abs().max().item()
            assert err <= 1e-5 * b.abs().max().item() + 1e-6, f"gradient of {name} differs by {err:.3g}"
    # the decoder runs on each row's prefix up to its last wanted position: a row whose wanted
    # positions stop early and one that wants only its first position
    prefix = torch.zeros_like(mask)
    prefix[1, :2] = True
    prefix[2, 0] = True
    torch.testing.assert_close(model.teacher_force(memory, tokens, positions=prefix), full[prefix], atol=1e-6,
                               rtol=1e-6)
    empty = model.teacher_force(memory, tokens, positions=torch.zeros_like(mask))
    assert empty.shape == (0, model.config.vocab_size)
    for bad in (mask.long(), mask[:, :-1], mask.tolist()):
        with pytest.raises(ValueError, match="positions must be a bool tensor shaped like tokens"):
            model.teacher_force(memory, tokens, positions=bad)


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


# -- decoder padding: <pad> keys are not masked, and need not be ----------------------------------
def _right_padded_batch(model, lengths=(7, 4, 2)):
    """Captions ``<bos> w.. <eos>`` of ``lengths`` tokens (inputs, <eos> included), right-padded."""
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    rows = []
    for n in lengths:
        words = torch.randint(3, cfg.vocab_size, (n - 2,), generator=g).tolist()
        rows.append([cfg.bos_id] + words + [cfg.eos_id] + [cfg.pad_id] * (max(lengths) - n))
    return torch.tensor(rows)


def test_right_padding_changes_no_real_position():
    """Teacher forcing on a right-padded batch: every real position's log-probabilities equal the
    caption's alone (causality hides the later <pad> keys), and the decoder's self-attention of a
    real query gives the <pad> keys weight 0 exactly."""
    model = make_model().eval()
    features, boxes, attention_mask, _ = make_inputs()
    lengths = (7, 4, 2)
    tokens = _right_padded_batch(model, lengths)
    with torch.no_grad():
        batch, record = model(features, boxes, attention_mask, tokens, return_attention=True)
        for i, n in enumerate(lengths):
            alone = model(features[i:i + 1], boxes[i:i + 1], attention_mask[i:i + 1], tokens[i:i + 1, :n])
            torch.testing.assert_close(batch[i:i + 1, :n], alone, atol=1e-5, rtol=0)
    pad_key = tokens == model.config.pad_id
    real_query = ~pad_key
    for probs in record.decoder_probs:  # [B, H, T, T]
        weights = probs.permute(0, 2, 3, 1)[real_query]  # [real queries, T keys, H]
        keys = pad_key[:, None, :].expand(-1, tokens.shape[1], -1)[real_query]
        assert (weights[keys] == 0).all()


def test_left_padding_is_refused():
    """<pad> before a real token would be attended (the keys are not masked): forward refuses it,
    naming tokens. Position 0 (<bos>) is exempt, so vocabularies with one id for <bos>, <eos> and
    <pad> (ORT's 0) still work with right padding."""
    model = make_model().eval()
    features, boxes, attention_mask, _ = make_inputs()
    left = torch.tensor([[1, 5, 6, 2], [1, 0, 7, 2], [1, 4, 2, 0]])
    with pytest.raises(ValueError, match=r"tokens row 1 holds <pad> \(id 0\) before a real token"):
        model(features, boxes, attention_mask, left)
    # why: a <pad> key before the words would change them (decode_step, which does not look
    # at padding, shows it)
    with torch.no_grad():
        memory = model.encode(features[1:2], boxes[1:2], attention_mask[1:2])
        padded, _ = model.decode_step(memory, torch.tensor([[1, 0, 7]]))
        plain, _ = model.decode_step(memory, torch.tensor([[1, 7]]))
    assert (padded - plain).abs().max() > 1e-3
    ort_style = make_model(pad_id=0, bos_id=0, eos_id=0).eval()
    tokens = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 0], [0, 4, 0, 0]])  # <bos> = 0, then words, then 0s
    with torch.no_grad():
        out = ort_style(features, boxes, attention_mask, tokens)
        alone = ort_style(features[2:], boxes[2:], attention_mask[2:], tokens[2:, :2])
    torch.testing.assert_close(out[2:, :2], alone, atol=1e-5, rtol=0)


def test_ended_rows_do_not_affect_other_rows_in_cached_decoding():
    """Batched decoding feeds <pad> to rows that ended (greedy, sampling) and reorders or drops
    beams (beam search): rows never mix, so a row's steps equal its decoding alone."""
    model = make_model().eval()
    features, boxes, attention_mask, _ = make_inputs()
    cfg = model.config
    live = torch.tensor([cfg.bos_id, 5, 9, 4, 7, 11])
    ended = torch.tensor([cfg.bos_id, 6, cfg.eos_id, cfg.pad_id, cfg.pad_id, cfg.pad_id])
    with torch.no_grad():
        memory = model.encode(features[:2], boxes[:2], attention_mask[:2])
        alone_memory = model.encode(features[1:2], boxes[1:2], attention_mask[1:2])
        cache = alone_cache = None
        for t in range(len(live)):
            # row 0 ended at t = 2; the rows swap places at t = 3 (as beams do), so row 1 is live
            if t == 3:
                swap = torch.tensor([1, 0])
                memory, cache = memory.index_select(swap), cache.index_select(swap)
            order = (ended[t], live[t]) if t < 3 else (live[t], ended[t])
            step, cache = model.decode_step(memory, torch.stack(order), cache)
            alone, alone_cache = model.decode_step(alone_memory, live[t:t + 1], alone_cache)
            torch.testing.assert_close(step[1 if t < 3 else 0], alone[0], atol=1e-5, rtol=0)


def test_box_features_append_each_box_and_area_to_its_features():
    from geocap.model.transformer import box_features

    model = make_model(geometry=False, box_features=True).eval()
    assert model.config.input_dim == TINY["feature_dim"] + 5
    assert model.feature_embed[0].weight.shape == (32, TINY["feature_dim"] + 5)
    features, boxes, attention_mask, tokens = make_inputs()
    extra = box_features(boxes, attention_mask, torch.float32)
    assert extra.shape == (3, 6, 5)
    b = boxes[1, 2]
    torch.testing.assert_close(extra[1, 2], torch.cat([b, ((b[2] - b[0]) * (b[3] - b[1]))[None]]))
    assert (extra[~attention_mask] == 0).all()
    # the embedding of the widened input is what the encoder sees: same output as a plain model fed them
    plain = make_model(geometry=False, feature_dim=TINY["feature_dim"] + 5).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(features, boxes, attention_mask, tokens),
                               plain(torch.cat([features, extra], -1), boxes, attention_mask, tokens))
    # so the boxes now matter (they do not without geometry or box features), and padded slots still do not
    moved = model(features, random_boxes(3, 6), attention_mask, tokens)
    assert (moved - model(features, boxes, attention_mask, tokens)).abs().max() > 1e-4
    nan_pad = boxes.masked_fill(~attention_mask[..., None], float("nan"))
    torch.testing.assert_close(model(features, nan_pad, attention_mask, tokens),
                               model(features, boxes, attention_mask, tokens))
    with pytest.raises(ValueError, match="box_features"):
        model.encode(features, None, attention_mask)
    assert ORTConfig.from_dict({"vocab_size": 9}).box_features is False     # a config saved before it existed
    with pytest.raises(ValueError, match="box_features"):
        ORTConfig(**TINY, box_features=1)
