"""geocap.data.vocab: tokens, the vocabulary, the captions directory round trip, files that do not
match, and ``geocap prepro captions`` on Karpathy and COCO files."""
from __future__ import annotations

import argparse
import hashlib
import json
import os

import h5py
import numpy as np
import pytest

from geocap.cli.prepro import add_parser as add_prepro_parser
from geocap.data.items import Caption, CaptionSet, DataError
from geocap.data.vocab import (BOS, EOS, PAD, SPECIALS, UNK, Vocabulary, build_vocab, caption_tokens,
                               encode_captions, load_captions, tokenize, write_captions)


def caption_set():
    """Images 30 (train, 3 captions), 10 (val, 2), 20 (train, 1, given tokens) and 40 (no split)."""
    caps = [
        Caption(30, 1, "A dog runs on the grass."),
        Caption(10, 2, "A cat sits on a mat"),
        Caption(30, 3, "The dog's ball, red & round!"),
        Caption(20, 4, "ignored text", tokens=["A", "dog", "", "on", "a", "mat"]),
        Caption(30, 5, "a dog a dog a dog a dog a dog a dog a dog a dog a dog"),
        Caption(10, 6, "a cat on the mat"),
        Caption(40, 7, "zebra"),
    ]
    return CaptionSet(captions=caps, splits={30: "train", 10: "val", 20: "train"})


def test_tokenize():
    assert tokenize("A man's dog, running!  Fast.") == ["a", "mans", "dog", "running", "fast"]
    assert tokenize("red&blue--green 2 cats") == ["red", "blue", "green", "2", "cats"]
    assert tokenize("Über café_bar") == ["über", "café", "bar"]
    assert caption_tokens(Caption(1, 1, "ignored", tokens=["A", " Dog ", ""])) == ["a", "dog"]
    assert caption_tokens(Caption(1, 1, "A Dog.", tokens=None)) == ["a", "dog"]


def test_build_vocab_keeps_frequent_words_in_a_fixed_order():
    vocab = build_vocab(caption_set(), min_count=2)
    assert vocab.words[:4] == list(SPECIALS) and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    # counts: a 15, dog 11, on 4, mat 3, the 3, cat 2 -> by count, then alphabetically
    assert vocab.words[4:] == ["a", "dog", "on", "mat", "the", "cat"]
    assert vocab.encode(["a", "zebra", "<pad>", "dog"]) == [4, UNK, UNK, 5]
    assert vocab.encode("a dog a dog".split(), max_len=3) == [4, 5, 4]
    assert vocab.decode([BOS, 4, 5, EOS, 6]) == "a dog" and vocab.decode([4, UNK, PAD, 5]) == "a <unk>"
    assert len(build_vocab(caption_set().captions, min_count=1)) == 4 + 14  # 14 distinct words
    with pytest.raises(ValueError):
        build_vocab(caption_set(), min_count=0)
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


def test_captions_directory_round_trip(tmp_path):
    vocab = build_vocab(caption_set(), min_count=2)
    encoded = encode_captions(caption_set(), vocab, max_len=5)
    write_captions(tmp_path / "caps", encoded)
    assert sorted(os.listdir(tmp_path / "caps")) == ["captions.h5", "vocab.json"]
    got = load_captions(tmp_path / "caps")
    assert got.vocab == vocab and got.max_len == 5 and len(got) == 7
    # grouped by image id, source order within an image
    assert got.image_id.tolist() == [10, 10, 20, 30, 30, 30, 40]
    assert got.caption_id.tolist() == [2, 6, 4, 1, 3, 5, 7]
    assert got.split_names == ["train", "val", "none"]
    assert [got.split_names[s] for s in got.split] == ["val", "val", "train", "train", "train", "train", "none"]
    assert got.tokens.shape == (7, 5) and got.tokens.dtype == np.int32
    assert got.length.tolist() == [5, 5, 5, 5, 5, 5, 1]
    assert vocab.decode(got.tokens[3]) == "a dog <unk> on the"
    assert got.tokens[6].tolist() == [UNK, 0, 0, 0, 0]
    assert got.reference[4] == "the dogs ball red round"  # untruncated, no <unk>
    assert got.references(30) == [got.reference[k] for k in (3, 4, 5)] and got.references(99) == []
    assert got.rows("train").tolist() == [2, 3, 4, 5] and got.rows("all").tolist() == list(range(7))
    assert got.rows("test").tolist() == []
    for name in ("image_id", "caption_id", "split", "tokens", "length"):
        np.testing.assert_array_equal(getattr(got, name), getattr(encoded, name))


@pytest.fixture
def caps_dir(tmp_path):
    vocab = build_vocab(caption_set(), min_count=2)
    write_captions(tmp_path / "caps", encode_captions(caption_set(), vocab, max_len=6))
    return tmp_path / "caps"


def _set_vocab(caps_dir, words):
    data = json.loads((caps_dir / "vocab.json").read_text())
    data["words"] = words
    (caps_dir / "vocab.json").write_text(json.dumps(data))


@pytest.mark.parametrize("how,name,message", [
    ("no vocab", "vocab.json", "vocabulary file missing"),
    ("no captions", "captions.h5", "captions file missing"),
    ("bad json", "vocab.json", "not a readable vocabulary"),
    ("foreign json", "vocab.json", "not a geocap vocabulary"),
    ("no specials", "vocab.json", "starts with"),
    ("other vocab", "captions.h5", "encoded with another vocabulary"),
    ("ids out of range", "captions.h5", "outside the vocabulary"),
    ("foreign h5", "captions.h5", "not a geocap captions file"),
    ("not h5", "captions.h5", "not a readable HDF5"),
    ("missing dataset", "captions.h5", "missing length"),
])
def test_mismatched_files_name_the_file(caps_dir, how, name, message):
    vocab_file, caps_file = caps_dir / "vocab.json", caps_dir / "captions.h5"
    if how == "no vocab":
        vocab_file.unlink()
    elif how == "no captions":
        caps_file.unlink()
    elif how == "bad json":
        vocab_file.write_text("{not json")
    elif how == "foreign json":
        vocab_file.write_text(json.dumps({"ix_to_word": {"1": "a"}}))
    elif how == "no specials":
        _set_vocab(caps_dir, ["a", "dog"])
    elif how == "other vocab":
        words = json.loads(vocab_file.read_text())["words"]
        _set_vocab(caps_dir, words[:4] + list(reversed(words[4:])))  # same size, other ids
    elif how == "ids out of range":
        # a vocabulary file that matches but ids past its end
        with h5py.File(caps_file, "a") as h5:
            h5["tokens"][0, 0] = 999
    elif how == "foreign h5":
        with h5py.File(caps_file, "w") as h5:
            h5["labels"] = np.zeros((2, 3))
    elif how == "not h5":
        caps_file.write_text("hello")
    elif how == "missing dataset":
        with h5py.File(caps_file, "a") as h5:
            del h5["length"]
    with pytest.raises(DataError) as err:
        load_captions(caps_dir)
    assert str(caps_dir / name) in str(err.value) and message in str(err.value), str(err.value)


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    encoded = encode_captions(caption_set(), build_vocab(caption_set(), min_count=2), max_len=6)

    def boom(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Vocabulary, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_captions(tmp_path / "caps", encoded)
    assert os.listdir(tmp_path / "caps") == []


# ---------------------------------------------------------------------------- prepro captions


def run_prepro(argv):
    parser = argparse.ArgumentParser(prog="geocap")
    add_prepro_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _karpathy_json(path):
    images = []
    sentid = 0
    for cocoid, split in [(1, "train"), (2, "restval"), (3, "val"), (4, "test")]:
        sentences = []
        for raw in ["A dog on a mat.", "A big dog!", f"Picture number {cocoid}"]:
            sentences.append({"raw": raw, "tokens": tokenize(raw), "sentid": sentid, "imgid": cocoid})
            sentid += 1
        images.append({"cocoid": cocoid, "split": split, "sentences": sentences, "filename": f"{cocoid}.jpg"})
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_prepro_captions_from_karpathy(tmp_path, capsys):
    src = _karpathy_json(tmp_path / "dataset_coco.json")
    assert run_prepro(["prepro", "captions", "--karpathy", str(src), "--out", str(tmp_path / "caps"),
                       "--min-count", "2", "--max-len", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 captions of 4 images" in out and "counted over train captions" in out
    got = load_captions(tmp_path / "caps")
    # counted over train + restval only: a 6, dog 4, then twice each; the numbers once each
    assert got.vocab.words[4:] == ["a", "dog", "big", "mat", "number", "on", "picture"]
    assert got.split_names == ["test", "train", "val"]
    assert got.rows("train").size == 6 and got.vocab.decode(got.tokens[got.rows("test")[2]]) == "picture number <unk>"
    assert run_prepro(["prepro", "captions", "--karpathy", str(src), "--out", str(tmp_path / "all"),
                       "--min-count", "2", "--vocab-split", "all", "--no-progress"]) == 0
    assert len(load_captions(tmp_path / "all").vocab) == len(got.vocab)


def test_prepro_captions_from_coco(tmp_path, capsys):
    for name, base in [("train.json", 0), ("val.json", 10)]:
        (tmp_path / name).write_text(json.dumps({
            "images": [{"id": base + 1, "width": 640, "height": 480, "file_name": "a.jpg"},
                       {"id": base + 2, "width": 640, "height": 480, "file_name": "b.jpg"}],
            "annotations": [{"image_id": base + 1, "id": base * 10 + 1, "caption": "A Dog on a mat."},
                            {"image_id": base + 2, "id": base * 10 + 2, "caption": "two dogs "}]}))
    assert run_prepro(["prepro", "captions", "--coco", str(tmp_path / "train.json"), str(tmp_path / "val.json"),
                       "--out", str(tmp_path / "caps"), "--min-count", "1", "--no-progress"]) == 0
    got = load_captions(tmp_path / "caps")
    assert got.image_id.tolist() == [1, 2, 11, 12] and got.split_names == ["none"]
    assert got.reference[0] == "a dog on a mat" and "counted over all captions" in capsys.readouterr().out
    with pytest.raises(DataError, match="missing.json"):
        run_prepro(["prepro", "captions", "--coco", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])


def test_prepro_captions_refuses_coco_captions_twice(tmp_path):
    """The same file twice (also under another name), or one annotation in two files, would
    double captions silently: refused, naming the files and the image."""
    one = {"images": [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "id": 11, "caption": "a dog"}]}
    (tmp_path / "a.json").write_text(json.dumps(one))
    (tmp_path / "sub").mkdir()
    (tmp_path / "copy.json").write_text(json.dumps(one))
    os.symlink(tmp_path / "a.json", tmp_path / "link.json")
    base = ["prepro", "captions", "--out", str(tmp_path / "caps"), "--min-count", "1", "--no-progress", "--coco"]
    for again in [tmp_path / "a.json", tmp_path / "sub" / ".." / "a.json", tmp_path / "link.json"]:
        with pytest.raises(DataError, match="given twice") as err:
            run_prepro([*base, str(tmp_path / "a.json"), str(again)])
        assert str(again) in str(err.value)
    with pytest.raises(DataError, match="image 1: annotation 11 is also in") as err:
        run_prepro([*base, str(tmp_path / "a.json"), str(tmp_path / "copy.json")])
    assert str(tmp_path / "a.json") in str(err.value) and str(tmp_path / "copy.json") in str(err.value)
    assert not (tmp_path / "caps").exists()


def test_prepro_captions_from_cocotalk(tmp_path, capsys):
    from data_formats import random_captions, write_cocotalk
    splits = {21: "restval", 20: "val", 22: "test", 23: "train"}
    captions = random_captions(np.random.default_rng(0), list(splits), per_image=5, max_words=12)
    write_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5", captions, splits)
    assert run_prepro(["prepro", "captions", "--cocotalk", str(tmp_path / "cocotalk.json"),
                       str(tmp_path / "cocotalk_label.h5"), "--out", str(tmp_path / "caps"), "--min-count", "1",
                       "--no-progress"]) == 0
    assert "wrote 20 captions of 4 images" in capsys.readouterr().out
    got = load_captions(tmp_path / "caps")
    assert sorted(set(got.image_id.tolist())) == [20, 21, 22, 23] and got.split_names == ["test", "train", "val"]
    by_image = {}
    for c in captions:
        by_image.setdefault(c.image_id, []).append(" ".join(t.lower() for t in c.tokens))
    for image_id, reference in zip(got.image_id.tolist(), got.reference):
        assert reference in by_image[image_id]


def test_vocabulary_with_other_special_ids(tmp_path):
    """ORT's layout: one id 0 for padding, start and end; its ordinary word "UNK" as unk_id, or none."""
    words = ["<eos>", "a", "dog", "UNK", "on"]
    vocab = Vocabulary(words, pad_id=0, bos_id=0, eos_id=0, unk_id=3)
    assert not vocab.has_default_ids and vocab.special_ids == {"pad_id": 0, "bos_id": 0, "eos_id": 0, "unk_id": 3}
    assert vocab.encode(["a", "zebra", "<eos>", "dog", "UNK"]) == [1, 3, 3, 2, 3]
    assert vocab.decode([1, 2, 3, 0, 4]) == "a dog UNK" and vocab.decode([0, 1]) == ""
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.special_ids == vocab.special_ids
    no_unk = Vocabulary(words, pad_id=0, bos_id=0, eos_id=0, unk_id=None)
    assert no_unk != vocab and no_unk.sha1 != vocab.sha1 and Vocabulary.from_dict(no_unk.to_dict()) == no_unk
    with pytest.raises(ValueError, match="zebra"):
        no_unk.encode(["a", "zebra"])
    with pytest.raises(ValueError, match="unk_id"):
        Vocabulary(words, pad_id=0, bos_id=0, eos_id=0, unk_id=0)
    with pytest.raises(ValueError, match="eos_id"):
        Vocabulary(words, pad_id=0, bos_id=0, eos_id=9, unk_id=None)
    # geocap's own vocabularies keep their fingerprint (captions.h5 written before stay readable)
    default = build_vocab(caption_set(), min_count=2)
    assert default.has_default_ids
    assert default.sha1 == hashlib.sha1("\n".join(default.words).encode()).hexdigest()


def test_vocab_file_without_ids_and_padding_with_the_pad_id(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"format": "geocap-vocab", "format_version": 1, "min_count": 2,
                                "words": list(SPECIALS) + ["a", "dog"]}))
    assert Vocabulary.load(path) == Vocabulary(list(SPECIALS) + ["a", "dog"], 2)
    path.write_text(json.dumps({"format": "geocap-vocab", "format_version": 1, "words": ["a", "b"], "eos_id": 5}))
    with pytest.raises(DataError, match="eos_id"):
        Vocabulary.load(path)
    # captions are padded with the vocabulary's pad_id and round-trip with its ids
    vocab = Vocabulary(["<unk>", "<end>", "a", "dog", "cat"], pad_id=1, bos_id=1, eos_id=1, unk_id=0)
    encoded = encode_captions(caption_set(), vocab, max_len=5)
    write_captions(tmp_path / "caps", encoded)
    got = load_captions(tmp_path / "caps")
    assert got.vocab == vocab and got.vocab.pad_id == 1
    assert got.tokens[6].tolist() == [0, 1, 1, 1, 1]  # "zebra": <unk>, then padding
    assert vocab.decode(got.tokens[0]) == "a cat <unk> <unk> a"


@pytest.mark.parametrize("damage", ["HEAP", "SNOD", "TREE", "random"])
def test_corrupt_hdf5_captions_and_cocotalk_labels_name_the_file(caps_dir, tmp_path, capsys, damage):
    """Damaged HDF5 metadata in a captions file (load_captions) or a cocotalk label file (prepro
    captions --cocotalk) is a DataError naming the file, and on the command line one line
    `geocap: error: ...` (h5py raises RuntimeError, KeyError, ValueError or OSError depending on
    the structure hit)."""
    from data_formats import corrupt_header_bytes, corrupt_signature, random_captions, write_cocotalk

    from geocap.cli import main as cli_main
    splits = {21: "restval", 20: "val", 22: "test", 23: "train"}
    captions = random_captions(np.random.default_rng(0), list(splits), per_image=5, max_words=12)
    write_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5", captions, splits)
    targets = {"captions": caps_dir / "captions.h5", "cocotalk": tmp_path / "cocotalk_label.h5"}
    pristine = {name: path.read_bytes() for name, path in targets.items()}
    failures = {name: 0 for name in targets}
    for seed in (range(20) if damage == "random" else [None]):
        for name, path in targets.items():
            path.write_bytes(pristine[name])
            if seed is None:
                corrupt_signature(path, damage.encode())
            else:
                corrupt_header_bytes(path, seed)
        try:
            load_captions(caps_dir)
        except DataError as err:
            failures["captions"] += 1
            assert str(targets["captions"]) in str(err), str(err)
        out = tmp_path / f"caps-{seed}"
        code = cli_main(["prepro", "captions", "--cocotalk", str(tmp_path / "cocotalk.json"),
                         str(targets["cocotalk"]), "--out", str(out), "--min-count", "1", "--no-progress"])
        err = capsys.readouterr().err
        if code != 0:
            failures["cocotalk"] += 1
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("geocap: error: "), err
            assert str(targets["cocotalk"]) in lines[0], err
            assert not out.exists()
    assert failures["captions"] and failures["cocotalk"], failures
