"""``update_image``: the analyses take one image's records at once (what a dump sends its writer, what
``geocap analyze`` reads in a run) and add the same sums as ``update`` on each record in turn, up to
float64 summation order, through every branch: stored entropies or maps, hypothetical and generated
records, records without cross maps or referents, captions of different lengths, referent regions,
and an image whose records disagree about its objects (each record then on its own). Bad records
are named as ``update`` names them."""
import numpy as np
import pytest

from geocap.analysis import StatsCollector, entropy, grounding, proximity, thematic
from geocap.analysis.accumulator import image_runs
from geocap.data.attention_record import Record
from geocap.errors import DataError

from test_analysis import assert_json_close, causal_softmax, make_record, softmax

L, H = 2, 3


def nats(p: np.ndarray) -> np.ndarray:
    """Row entropies in nats, float32 (as the fused kernels store them)."""
    p = p.astype(np.float64)
    return (-np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)).astype(np.float32)


def caption(rng, base: Record, caption_id: int, t: int, *, kind="reference", stored=True, regions=None) -> Record:
    """Another caption of ``base``'s image: the same objects and encoder maps (the same arrays, as a
    dump's records share them), its own tokens, decoder and cross maps and referents."""
    n = base.num_objects
    referents = np.full(t, -1)
    referents[::2] = rng.integers(0, n if regions is None else len(regions), size=len(referents[::2]))
    rec = Record(image_id=base.image_id, caption_id=caption_id, kind=kind, boxes=base.boxes,
                 tokens=[f"w{i}" for i in range(t)], clusters=base.clusters, labels=base.labels,
                 features=base.features, referents=referents, encoder_self=base.encoder_self, extra=base.extra,
                 decoder_self=causal_softmax(rng.normal(size=(L, H, t, t)) * 3).astype(np.float16),
                 cross=softmax(rng.normal(size=(L, H, t, n)) * 3).astype(np.float16))
    if kind == "hypothetical":
        rec.source_referents = np.where(referents >= 0, (referents + 1) % (n if regions is None else len(regions)),
                                        -1)
    if stored:
        rec.encoder_entropy = nats(rec.encoder_self)
        rec.decoder_entropy = nats(rec.decoder_self)
        rec.cross_entropy = nats(rec.cross)
        rec.decoder_self = None                   # (as a stats-only dump sends them: the entropies stand in)
    return rec


def image_mix(seed: int = 0) -> list:
    """Records of several images, consecutive per image, through every branch of the analyses."""
    rng = np.random.default_rng(seed)
    out = []
    for image in range(8):
        n = int(rng.integers(3, 9))
        base = make_record(rng, image, n=n, layers=L, heads=H, with_labels=image % 3 == 0,
                           with_clusters=image % 3 != 0, with_features=image % 2 == 0)
        if image == 5:                            # referent regions and a special object (a patch grid's class token)
            base.extra = {"special_objects": [0], "referent_objects": [[1, 2], [3], list(range(4, n))]}
        regions = (base.extra or {}).get("referent_objects")
        every = image >= 5                        # every record with stored entropies, or some from their maps
        recs = [caption(rng, base, c, int(rng.integers(2, 9)), stored=every or c % 3 != 1, regions=regions)
                for c in range(4)]
        recs.append(caption(rng, base, 4, 5, kind="hypothetical", regions=regions))
        recs.append(caption(rng, base, 5, 4, kind="generated", stored=every, regions=regions))
        if image == 2:
            recs[1].cross = None                  # no cross maps (nor their entropies)
            recs[1].cross_entropy = None
            recs[2].referents = None
        if image == 3:                            # one record disagrees about the objects: each on its own
            recs[3].labels = np.arange(n)
        if image == 4:
            recs = [r for r in recs if r.kind != "hypothetical"]
        out += recs
    return out


def states_close(a: dict, b: dict) -> bool:
    assert set(a) == set(b), set(a) ^ set(b)
    return all(np.shape(a[k]) == np.shape(b[k]) and np.allclose(a[k], b[k], rtol=1e-12, atol=1e-14) for k in a)


def by_record(recs) -> StatsCollector:
    collector = StatsCollector(reservoir=500)
    for r in recs:
        collector.update(r)
    return collector


def by_image(recs) -> StatsCollector:
    collector = StatsCollector(reservoir=500)
    for run in image_runs(recs):
        collector.update_image(run)
    return collector


def test_update_image_adds_what_update_adds_record_by_record():
    recs = image_mix()
    assert len(list(image_runs(recs))) == 8
    one, runs = by_record(recs), by_image(recs)
    assert one.records == runs.records == len(recs)
    assert states_close(one.state(), runs.state())
    for part in ("entropy", "grounding", "thematic", "proximity"):     # every measure was exercised
        assert one.to_json()[part]["records"] > 0
    assert one.to_json()["grounding"]["referent_effect"] is not None
    assert one.to_json()["grounding"]["hypothetical_follow_rate"] is not None
    # each analysis alone (fold: by image runs) equals the collector's part fed record by record
    expected = one.results()
    for name, alone in (("entropy", entropy(recs)), ("grounding", grounding(recs)), ("thematic", thematic(recs)),
                        ("proximity", proximity(recs, reservoir=500))):
        assert_json_close(expected[name].to_json(), alone.to_json())


def test_the_comparison_sees_a_wrong_record():
    """The check above is not blind: one caption's cross map flipped over its objects, or one record
    left out of its image, changes the state."""
    recs = image_mix()
    want = by_record(recs).state()
    flipped = image_mix()
    flipped[7].cross = np.ascontiguousarray(flipped[7].cross[..., ::-1])
    assert not states_close(want, by_image(flipped).state())
    assert not states_close(want, by_image(recs[:3] + recs[4:]).state())


def test_update_image_names_the_bad_record():
    recs = [r for r in image_mix() if r.image_id == 1]
    with pytest.raises(DataError, match="image 1 .*image 2"):
        StatsCollector().update_image(recs[:2] + [r for r in image_mix() if r.image_id == 2][:1])
    bad = [r for r in image_mix() if r.image_id == 1]
    bad[3].cross = bad[3].cross.astype(np.float32)
    bad[3].cross[0, 0, 0, 0] = -1e-3
    with pytest.raises(DataError, match="image 1 \\(caption 3, reference\\): cross holds NaN, infinite or negative"):
        StatsCollector().update_image(bad)
    for image in (1, 6):                          # some records' entropies from maps; every record's stored
        bad = [r for r in image_mix() if r.image_id == image]
        assert bad[2].cross_entropy is not None
        bad[2].cross_entropy = bad[2].cross_entropy.copy()
        bad[2].cross_entropy[0, 0, 0] = np.nan
        with pytest.raises(DataError, match=f"image {image} \\(caption 2, reference\\): cross_entropy holds NaN"):
            StatsCollector().update_image(bad)
    other = [r for r in image_mix() if r.image_id == 1]
    other[2].cross, other[2].cross_entropy = None, np.zeros((L + 1, H, other[2].num_tokens), np.float32)  # 3 layers
    with pytest.raises(DataError, match="caption 2.*cannot be pooled"):
        StatsCollector().update_image(other)
    with pytest.raises(ValueError, match="Record"):
        StatsCollector().update_image([recs[0], {"image_id": 1}])
