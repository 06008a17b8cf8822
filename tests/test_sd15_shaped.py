"""helpers.sd15_shaped and ``python -m helpers.commands.sd15_shaped``: the written pipeline folder loads the way
users load SD1.5 and the kit loads a custom model; the generated data folder is what CD_KIT_DATA expects, and
its captions describe its images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import sd15_shaped as shaped
from helpers.captions_data import load_image_caption_folder
from helpers.commands import sd15_shaped as command
from helpers.config import KitConfig


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15_shaped")
    assert command.main(["--out", str(root / "pipe"), "--size", "small", "--data", str(root / "data"),
                         "--images", "12"]) == 0
    return root / "pipe", root / "data"


def test_pipeline_folder_loads_with_from_pretrained_in_the_small_shape(written):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(written[0], safety_checker=None, requires_safety_checker=False)
    for part, config in (("unet", shaped.TINY_UNET), ("vae", shaped.TINY_VAE)):
        saved = getattr(pipe, part).config
        as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        assert {k: as_list(saved[k]) for k in config} == config, part
    assert pipe.text_encoder.config.hidden_size == shaped.TINY_TEXT["hidden_size"]
    assert {k: pipe.scheduler.config[k] for k in shaped.SD15_SCHEDULER} == shaped.SD15_SCHEDULER
    assert json.loads((written[0] / "sd15_shaped.json").read_text())["size"] == "small"


def test_the_kit_loads_it_as_a_custom_model_and_samples(written):
    from helpers.models import load_course_pipeline, resolve_model

    config = KitConfig(model=str(written[0]), device="cpu")
    assert resolve_model(config.model).kind == "custom"
    pipe = load_course_pipeline(config)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    images = pipe("a red circle on a blue background", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_tokenizer_files_for_older_transformers_give_the_same_ids(written):
    from transformers import CLIPTokenizer

    folder = written[0] / "tokenizer"
    old_style = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    new_style = CLIPTokenizer.from_pretrained(folder)
    text = "A sad puppy with large eyes"
    assert old_style(text).input_ids == new_style(text).input_ids


def test_data_folder_loads_and_captions_name_the_colours_of_the_image(written):
    data = load_image_caption_folder(written[1], size=32)
    assert len(data) == 12
    for i in range(len(data)):
        caption = data.captions[i]
        words = caption.split()
        colour, background = words[1], words[-2]
        assert words[2] in shaped.SHAPES, caption
        pixels = ((data[i]["pixel_values"] + 1) * 127.5).permute(1, 2, 0).reshape(-1, 1, 3).numpy()
        palette = np.array(list(shaped.COLOURS.values()), dtype=np.float32)
        nearest = np.abs(pixels - palette[None]).sum(-1).argmin(1)  # each pixel's palette colour
        counts = np.bincount(nearest, minlength=len(palette))
        first, second = (list(shaped.COLOURS)[j] for j in np.argsort(-counts)[:2])
        assert (first, second) == (background, colour), f"{caption}: most pixels are {first}, then {second}"


def test_command_refuses_a_folder_that_is_not_empty(written, capsys):
    assert command.main(["--out", str(written[0]), "--size", "small"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_write_pipeline_rejects_an_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="size must be one of"):
        shaped.write_pipeline(tmp_path / "p", size="medium")


def test_caption_folder_is_the_same_with_worker_processes(tmp_path):
    """Each image has its own seed: the folder does not depend on how many processes wrote it."""
    one = shaped.write_caption_folder(tmp_path / "one", images=5, size=16, seed=3, workers=1)
    two = shaped.write_caption_folder(tmp_path / "two", images=5, size=16, seed=3, workers=2)
    assert (one / "metadata.csv").read_text() == (two / "metadata.csv").read_text()
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 5
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    other = shaped.write_caption_folder(tmp_path / "other", images=5, size=16, seed=4, workers=1)
    assert (other / names[0]).read_bytes() != (one / names[0]).read_bytes()
