"""What a Hugging Face captioner's dump reads of an image: the part its processor keeps (a centre
crop mapped back onto the original image, or refused), the EXIF orientation, 16-bit grey levels."""
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")

from PIL import Image, ImageOps  # noqa: E402
from test_hf_dump import hf_data  # noqa: E402,F401  (its fixture: the tiny model, images, COCO files)

from geocap.data.dump_format import open_dump  # noqa: E402
from geocap.hf import PatchGrid  # noqa: E402
from geocap.hf.crop import UnsupportedProcessor, processor_window  # noqa: E402
from geocap.hf.dump import dump_hf  # noqa: E402
from geocap.hf.images import read_image  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402
from geocap.hf.referents import category_regions  # noqa: E402

transformers = import_transformers()


def deit(**kw):        # DeiT's default, scaled down: resize to 40 x 40, crop the centre 32 x 32
    return transformers.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                           **kw)


def clip():            # CLIP's: the shortest edge to 32, crop the centre 32 x 32
    return transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_crop_windows():
    assert processor_window(deit(), 48, 32) == ((4 / 40, 4 / 40, 36 / 40, 36 / 40), (32, 32))
    assert processor_window(clip(), 48, 32) == ((8 / 48, 0.0, 40 / 48, 1.0), (32, 32))     # landscape: sides cut
    assert processor_window(clip(), 30, 45) == ((0.0, 8 / 48, 1.0, 40 / 48), (32, 32))     # 45 * 32 / 30 = 48 rows
    assert processor_window(transformers.ViTImageProcessor(size={"height": 32, "width": 32}), 48, 32) == \
        ((0.0, 0.0, 1.0, 1.0), (32, 32))
    with pytest.raises(UnsupportedProcessor, match="image processor .* crops 50x50 out of a 40x40"):
        processor_window(transformers.DeiTImageProcessor(size={"height": 40, "width": 40},
                                                         crop_size={"height": 50, "width": 50}), 48, 32)
    with pytest.raises(UnsupportedProcessor, match="size longest_edge=64 is not supported"):
        processor_window(transformers.ViTImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}), 48, 32)


@pytest.mark.parametrize("make", [deit, clip])
@pytest.mark.parametrize("size", [(48, 32), (30, 45)])
def test_the_window_is_where_the_processor_put_each_pixel(make, size):
    """A bright square anywhere inside the window lands, after the processor, in the patch whose
    box (in the original image's coordinates) holds the square's centre."""
    width, height = size
    processor = make()
    window, _ = processor_window(processor, width, height)
    grid = PatchGrid(4, 4, prefix=0, window=window)
    boxes = grid.boxes()
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(12):
        x = rng.uniform(window[0] * width + 2, window[2] * width - 2)
        y = rng.uniform(window[1] * height + 2, window[3] * height - 2)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 255
        values = processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"][0].mean(0)
        brightest = int(torch.argmax(values.reshape(4, 8, 4, 8).sum((1, 3))))       # 8-pixel patches
        cx, cy = (int(x) + 0.5) / width, (int(y) + 0.5) / height
        b = boxes[brightest]
        hits += bool(b[0] <= cx <= b[2] and b[1] <= cy <= b[3])
    assert hits >= 11, hits                   # a square on a patch edge may go either way


def _copy_model(root, folder, processor):
    shutil.copytree(root / "model", folder)
    os.remove(folder / "preprocessor_config.json")
    processor.save_pretrained(folder)


def test_a_centre_cropping_processor_is_mapped_onto_the_image(hf_data, tmp_path):
    root, captions, instances = hf_data
    _copy_model(root, tmp_path / "model", deit())
    dump_hf(tmp_path / "model", root / "images", tmp_path / "dump", captions=captions, instances=instances,
            writer="inline", progress=False)
    records = list(open_dump(tmp_path / "dump", progress=False))
    window = (4 / 40, 4 / 40, 36 / 40, 36 / 40)
    grid = PatchGrid(4, 4, prefix=1, window=window)
    for r in records:
        np.testing.assert_array_equal(r.boxes, grid.boxes())
        patches = r.boxes[1:]
        assert [patches[:, 0].min(), patches[:, 1].min(), patches[:, 2].max(), patches[:, 3].max()] == \
            pytest.approx(list(window))
    first = records[0]          # image 7: dog box (0, 0, 16, 16), cat (20, 20, 12, 12), light (16, 0, 16, 8)
    expected = category_regions(grid, [(1, (0, 0, 16 / 48, 16 / 32)), (2, (20 / 48, 20 / 32, 32 / 48, 1.0)),
                                       (3, (16 / 48, 0, 32 / 48, 8 / 32))])
    assert first.extra["referent_objects"] == [expected[1], expected[2], expected[3]]
    whole = category_regions(PatchGrid(4, 4, prefix=1), [(2, (20 / 48, 20 / 32, 32 / 48, 1.0))])
    assert expected[2] == [15] != whole[2]          # the cat's box covers fewer patch centres in the crop
    # a box the crop cut away names no patch
    assert category_regions(grid, [(4, (0.0, 0.0, 0.05, 0.05))]) == {}


def test_a_padding_processor_is_refused_before_anything_is_written(hf_data, tmp_path):
    root, captions, _ = hf_data
    _copy_model(root, tmp_path / "model", transformers.ViTImageProcessor(size={"shortest_edge": 32,
                                                                               "longest_edge": 64}))
    with pytest.raises(UnsupportedProcessor, match="ViTImageProcessor.*longest_edge=64 is not supported"):
        dump_hf(tmp_path / "model", root / "images", tmp_path / "dump", captions=captions, progress=False)
    assert not (tmp_path / "dump").exists()


def test_exif_orientation_and_16_bit_grey(hf_data, tmp_path):
    root, _, _ = hf_data
    folder = tmp_path / "images"
    folder.mkdir()
    raw = np.zeros((32, 48, 3), np.uint8)
    raw[:, :24] = (255, 0, 0)                   # stored: red left half, blue right half, 48 wide
    raw[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                            # shown turned 90 degrees clockwise: 32 wide, red on top
    Image.fromarray(raw).save(folder / "img_0001.jpg", exif=exif, quality=95)
    grey = (np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)      # up to 61400 of 65535
    Image.fromarray(grey).save(folder / "img_0002.png")
    upright = read_image(str(folder / "img_0001.jpg"), 1)
    assert upright.size == (32, 48)
    assert np.asarray(upright)[5, 16, 0] > 200 and np.asarray(upright)[40, 16, 2] > 200   # red top, blue bottom
    with Image.open(folder / "img_0001.jpg") as original:
        assert np.array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(original).convert("RGB")))
    levels = np.asarray(read_image(str(folder / "img_0002.png"), 2))
    assert levels.shape == (32, 48, 3) and (levels == np.round(grey / 257.0)[..., None]).all()
    dump_hf(root / "model", folder, tmp_path / "dump", writer="inline", progress=False, max_len=2)
    first, second = open_dump(tmp_path / "dump", progress=False)
    assert (first.extra["width"], first.extra["height"]) == (32, 48)      # the upright image's size
    assert (second.extra["width"], second.extra["height"]) == (48, 32)
