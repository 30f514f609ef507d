"""The README's Python examples run as written: the Captioner example against a checkpoint that
`geocap train` wrote, so the file names it uses cannot drift from what training writes."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from geocap.train import BEST, TrainConfig, train
from helpers import random_boxes, synth_data_dir

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block_with(text: str) -> str:
    """The README's one ```python block that contains ``text``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S) if text in b]
    assert len(blocks) == 1, f"README.md: {len(blocks)} python blocks contain {text!r}"
    return blocks[0]


def test_captioner_example_loads_what_training_writes(tmp_path, monkeypatch):
    example = python_block_with("Captioner.load(")
    path = re.search(r'Captioner\.load\("([^"]+)"\)', example).group(1)
    assert Path(path).name == BEST, f"README loads {path}; training writes {BEST}"
    data = synth_data_dir(tmp_path / "data", images=40, feature_dim=16)
    run = tmp_path / "work" / Path(path).parent
    train(TrainConfig(data=data, out=str(run), steps=2, val_every=2, checkpoint_every=0, layers=1, d_model=32,
                      heads=2, d_ff=64, batch_size=4, progress=False))
    monkeypatch.chdir(tmp_path / "work")
    g = torch.Generator().manual_seed(0)
    features, boxes = torch.randn(2, 5, 16, generator=g), random_boxes(2, 5, generator=g)
    attention_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tokens = torch.randint(4, 20, (2, 3), generator=g)
    scope = dict(features=features, boxes=boxes, attention_mask=attention_mask, tokens=tokens)
    # the example's last two lines are expressions: keep their values
    lines = example.strip().splitlines()
    exec("\n".join(lines[:-2]), scope)
    captions = eval(lines[-2].split("#")[0], scope)
    log_probs = eval(lines[-1].split("#")[0], scope)
    assert isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert log_probs.shape[:2] == (2, 4) and log_probs.shape[2] == len(scope["cap"].vocab)


def test_box_limits_the_readme_states_are_the_code_s():
    """The box limits docs/data.md states (the README's data page) are the constants the code uses."""
    from geocap.data.readers._common import FAR_OUTSIDE
    from geocap.data.store import BOX_TOLERANCE
    from geocap.kernels.validation import BOX_SLACK

    text = " ".join((README.parent / "docs" / "data.md").read_text(encoding="utf-8").split())
    stated = {name: float(re.search(pattern, text).group(1)) for name, pattern in [
        ("FAR_OUTSIDE", r"a normalised coordinate up to (\S+) outside \[0, 1\]"),
        ("BOX_TOLERANCE", r"clipped within (\S+) of \[0, 1\] and refused beyond"),
        ("BOX_SLACK", r"a coordinate up to (\S+) outside \[0, 1\] is used as given")]}
    assert stated == {"FAR_OUTSIDE": FAR_OUTSIDE, "BOX_TOLERANCE": BOX_TOLERANCE, "BOX_SLACK": BOX_SLACK}
