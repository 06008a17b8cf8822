"""The SD1.5 image-caption folder loader and the COCO subset script, on small generated folders."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.captions_data import DATA_ENV_VAR, data_folder, load_image_caption_folder
from helpers.course import KIT_ROOT


def _image(path: Path, width: int, height: int, value: int = 200) -> None:
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)


def _csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("file_name", "text")) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three images of different shapes; a caption with a comma and quotes."""
    _image(tmp_path / "wide.png", 48, 24)
    _image(tmp_path / "tall.jpg", 20, 40, value=30)
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "square.png", 16, 16)
    _csv(tmp_path / "metadata.csv", [("wide.png", 'a wide, grey "thing"'), ("tall.jpg", "a dark tall one"),
                                     ("sub/square.png", "a square")])
    return tmp_path


def test_good_folder_loads_as_square_tensors_in_minus_one_one(folder):
    data = load_image_caption_folder(folder, size=16)
    assert len(data) == 3 and data.captions == ['a wide, grey "thing"', "a dark tall one", "a square"]
    item = data[1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert torch.allclose(item["pixel_values"], torch.full((3, 16, 16), 30 / 127.5 - 1), atol=2e-2)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["caption"][2] == "a square"
    assert len(load_image_caption_folder(folder, size=16, limit=2)) == 2


def test_center_crop_keeps_the_middle_instead_of_squashing(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # white middle square, black sides
    Image.fromarray(pixels).save(tmp_path / "x.png")
    _csv(tmp_path / "metadata.csv", [("x.png", "white square")])
    out = load_image_caption_folder(tmp_path, size=20)[0]["pixel_values"]
    # squashing would leave a third of the columns black; cropping leaves at most a 1-px resampling edge
    assert out[:, :, 1:-1].min() > 0.95 and out.mean() > 0.9, "the black sides should have been cropped away"


def test_folder_from_the_data_setting(folder, make_config):
    assert len(load_image_caption_folder(make_config(data=str(folder)).data, size=8)) == 3
    with pytest.raises(FileNotFoundError, match=DATA_ENV_VAR):  # unset: the message names the variable to set
        data_folder(make_config().data)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*docs/data.md"):
        load_image_caption_folder(tmp_path / "nowhere")


def test_missing_csv(folder):
    (folder / "metadata.csv").rename(folder / "captions.csv")
    with pytest.raises(FileNotFoundError, match="No metadata.csv"):
        load_image_caption_folder(folder)
    assert len(load_image_caption_folder(folder, csv_name="captions.csv", size=8)) == 3


def test_wrong_columns_and_empty_captions(folder):
    _csv(folder / "metadata.csv", [("wide.png", "x")], header=("file_name", "caption"))
    with pytest.raises(ValueError, match="needs a header with 'file_name' and 'text'"):
        load_image_caption_folder(folder)
    assert load_image_caption_folder(folder, caption_column="caption", size=8).captions == ["x"]
    _csv(folder / "metadata.csv", [("wide.png", "fine"), ("tall.jpg", "  ")])
    with pytest.raises(ValueError, match=r"line\(s\) 3"):
        load_image_caption_folder(folder)


def test_missing_images_are_listed(folder):
    _csv(folder / "metadata.csv", [("wide.png", "a"), ("gone1.jpg", "b"), ("gone2.jpg", "c")])
    with pytest.raises(FileNotFoundError, match="2 image.*gone1.jpg, gone2.jpg"):
        load_image_caption_folder(folder)


def test_file_that_is_not_an_image(folder):
    (folder / "tall.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match="not readable images: tall.jpg"):
        load_image_caption_folder(folder)


def test_truncated_image_fails_when_read_and_names_the_file(folder):
    data = (folder / "wide.png").read_bytes()
    (folder / "wide.png").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    dataset = load_image_caption_folder(folder, size=8)
    with pytest.raises(ValueError, match="Cannot read image .*wide.png"):
        dataset[0]


def test_bad_size_or_limit(folder):
    with pytest.raises(ValueError, match="must be positive"):
        load_image_caption_folder(folder, limit=0)


# ------------------------------------------------------------------------------------ COCO subset script
def _script():
    spec = importlib.util.spec_from_file_location("make_coco_subset", KIT_ROOT / "scripts" / "make_coco_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    """A COCO-shaped captions file: 5 images with two captions each and one image without captions."""
    images = tmp_path / "train2014"
    images.mkdir()
    ann = {"images": [], "annotations": []}
    for i in range(6):
        name = f"COCO_train2014_{i:012d}.jpg"
        _image(images / name, 30 + i, 20)
        ann["images"].append({"id": i, "file_name": name})
        if i < 5:
            ann["annotations"] += [{"image_id": i, "id": 10 * i + k, "caption": f"image {i}, caption {k}\n"}
                                   for k in range(2)]
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return tmp_path / "captions.json", images


def test_coco_script_writes_a_folder_the_loader_reads(coco, tmp_path):
    annotations, images = coco
    args = ["--annotations", str(annotations), "--images", str(images), "--n", "3", "--size", "16"]
    assert _script().main([*args, "--out", str(tmp_path / "a")]) == 0
    data = load_image_caption_folder(tmp_path / "a", size=16)
    assert len(data) == 3 and data[0]["pixel_values"].shape == (3, 16, 16)
    for name, caption in data.rows:
        i = int(Path(name).stem.split("_")[-1])
        assert i < 5 and caption in (f"image {i}, caption 0", f"image {i}, caption 1")  # own caption, no newline
    assert Image.open(tmp_path / "a" / data.rows[0][0]).size == (16, 16)

    assert _script().main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "metadata.csv").read_text() == (tmp_path / "b" / "metadata.csv").read_text(), \
        "the same seed must give the same subset"
    assert _script().main([*args, "--size", "0", "--out", str(tmp_path / "c")]) == 0
    first = load_image_caption_folder(tmp_path / "c").rows[0][0]
    assert (tmp_path / "c" / first).read_bytes() == (images / first).read_bytes(), "--size 0 copies originals"


def test_coco_script_errors(coco, tmp_path, capsys):
    annotations, images = coco
    script = _script()
    assert script.main(["--annotations", str(annotations), "--images", str(images), "--n", "6",
                        "--out", str(tmp_path / "o")]) == 1
    assert "only 5" in capsys.readouterr().err
    assert script.main(["--annotations", str(annotations), "--images", str(tmp_path), "--n", "2",
                        "--out", str(tmp_path / "o")]) == 1
    assert "point --images at the unzipped train2014" in capsys.readouterr().err
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "categories": []}))
    assert script.main(["--annotations", str(tmp_path / "instances.json"), "--images", str(images),
                        "--out", str(tmp_path / "o")]) == 1
    assert "not a COCO captions annotation file" in capsys.readouterr().err
