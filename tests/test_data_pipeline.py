"""The embedded default end to end through the command line: synth -> prepro -> DataLoader ->
geometry attention on a real batch."""
import json

import torch

from geocap.cli import main
from geocap.data.dataset import CaptionDataset, collate
from geocap.kernels import geo_attention


def test_synth_prepro_dataset_attention(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--images", "60", "--feature-dim", "64", "--seed", "3"]) == 0
    assert main(["prepro", "captions", "--karpathy", str(out / "dataset_coco.json"), "--out", str(out / "caps"),
                 "--min-count", "1"]) == 0
    assert main(["prepro", "features", "--from", "store", str(out / "features.h5"), "--out", str(out / "f32.h5"),
                 "--dtype", "float32", "--no-progress"]) == 0
    capsys.readouterr()

    data = CaptionDataset(out / "f32.h5", out / "caps", "train")
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate, shuffle=False)
    batch = next(iter(loader))
    b, n, d = batch.features.shape
    assert d == 64 and batch.attention_mask.shape == (b, n) and batch.attention_mask.any(-1).all()
    assert batch.captions.shape[0] == b and (batch.caption_lengths > 2).all()

    heads = 2
    x = batch.features.view(b, n, heads, d // heads).transpose(1, 2)        # [B, H, N, d/H]
    result = geo_attention(x, x, x, batch.boxes, torch.randn(heads, 64) * 0.3, torch.zeros(heads) + 0.5,
                           batch.attention_mask, return_entropy=True, backend="torch")
    assert torch.isfinite(result.out).all() and torch.isfinite(result.entropy).all()

    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth and (out / "captions_coco.json").exists()


def test_synth_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--images", "0"]) == 2
    assert "images must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x" / "features.h5").exists()
    assert main(["prepro", "features", "--from", "tsv", str(tmp_path / "missing.tsv"), "--out",
                 str(tmp_path / "o.h5")]) == 2
    assert "missing.tsv" in capsys.readouterr().err
