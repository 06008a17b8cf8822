"""Training data for SD1.5: a local folder of images with a captions CSV (see docs/data.md).

The folder follows the Hugging Face ``imagefolder`` metadata convention, so the same folder also loads
with ``datasets.load_dataset("imagefolder", data_dir=folder)`` and with diffusers' text-to-image training
script (whose default caption column is ``text``)::

    coco5k/
      metadata.csv          # header: file_name,text   (one row per image; quote captions with commas)
      000000000009.jpg      # file_name is relative to the folder (subfolders allowed)
      ...

The old course trained on 5,000 COCO train2014 image-caption pairs at 512x512; ``scripts/make_coco_subset.py``
builds that folder from a COCO download (nothing here downloads anything). The folder to use comes from the
argument (the notebooks pass ``config.data``, the setting of the environment variable ``CD_KIT_DATA``). The
kit's small model needs none of this: its digits ship with scikit-learn.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from helpers.config import KitConfig

__all__ = ["DATA_ENV_VAR", "DEFAULT_CSV", "CAPTION_COLUMN", "ImageCaptionFolder", "center_crop_resize",
           "read_captions", "data_folder", "load_image_caption_folder"]

DATA_ENV_VAR = KitConfig.env_var("data")
DEFAULT_CSV = "metadata.csv"
FILE_COLUMN = "file_name"
CAPTION_COLUMN = "text"
HOW_TO = "see docs/data.md for the layout and scripts/make_coco_subset.py to build a COCO subset"


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``image``, resized to ``size`` x ``size`` (bicubic), in RGB."""
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def read_captions(csv_path: str | Path, caption_column: str = CAPTION_COLUMN) -> list[tuple[str, str]]:
    """``[(file_name, caption), ...]`` from a captions CSV with a header row (columns ``file_name`` and
    ``caption_column``; other columns are ignored). Errors say which rows or columns are wrong."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if FILE_COLUMN not in columns or caption_column not in columns:
            raise ValueError(f"{csv_path} has columns {columns}; it needs a header with {FILE_COLUMN!r} and "
                             f"{caption_column!r} ({HOW_TO})")
        rows = [(row[FILE_COLUMN] or "", row[caption_column] or "") for row in reader]
    if not rows:
        raise ValueError(f"{csv_path} lists no images ({HOW_TO})")
    empty = [i + 2 for i, (name, caption) in enumerate(rows) if not name.strip() or not caption.strip()]
    if empty:
        raise ValueError(f"{csv_path}: empty {FILE_COLUMN} or {caption_column} on line(s) {_some(empty)}; "
                         "fill them in or delete those rows")
    return rows


def _some(items: list, n: int = 10) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Image-caption pairs of a checked folder. Item ``i``: ``{"pixel_values": (3, size, size) float tensor
    in [-1, 1] (what the SD VAE encodes), "caption": str, "file_name": str}``; batches with a plain
    ``torch.utils.data.DataLoader``."""

    def __init__(self, folder: Path, rows: list[tuple[str, str]], size: int) -> None:
        self.folder, self.rows, self.size = folder, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str]:
        return [caption for _, caption in self.rows]

    def __getitem__(self, index: int) -> dict:
        name, caption = self.rows[index]
        path = self.folder / name
        try:
            with Image.open(path) as image:
                square = center_crop_resize(image, self.size)
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"Cannot read image {path} ({err}): replace the file, or delete its row from "
                             "the captions CSV") from err
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)
        return {"pixel_values": pixels / 127.5 - 1.0, "caption": caption, "file_name": name}


def data_folder(folder: str | Path | None = None) -> Path:
    """The image-caption folder ``folder`` (e.g. ``config.data``); a clear error when it is not set."""
    chosen = folder
    if not chosen:
        raise FileNotFoundError(f"No training data folder given: pass one, or set {DATA_ENV_VAR}=/path/to/folder "
                                f"(the notebooks pass config.data) ({HOW_TO})")
    return Path(chosen).expanduser()


def _unreadable(folder: Path, names: list[str]) -> list[str]:
    """Files whose header PIL cannot identify as an image (cheap: the pixels are not decoded)."""
    bad = []
    for name in names:
        try:
            with Image.open(folder / name):
                pass
        except (OSError, UnidentifiedImageError):
            bad.append(name)
    return bad


def load_image_caption_folder(folder: str | Path | None = None, csv_name: str = DEFAULT_CSV, size: int = 512,
                              limit: int | None = None, caption_column: str = CAPTION_COLUMN) -> ImageCaptionFolder:
    """Check an image-caption folder and return it as a dataset (see :class:`ImageCaptionFolder`).

    ``folder`` (e.g. ``config.data``) holds the images and ``csv_name`` (columns ``file_name`` and
    ``caption_column``); each image is centre-cropped to a square and resized to ``size``; ``limit`` keeps
    the first rows only. Raises, with what to do: a missing folder or CSV, bad CSV columns or rows, listed
    images that do not exist, files that are not images.
    """
    root = data_folder(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist ({HOW_TO})")
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise FileNotFoundError(f"No {csv_name} in {root}: the folder needs a captions CSV with columns "
                                f"{FILE_COLUMN},{caption_column} ({HOW_TO})")
    if size <= 0 or (limit is not None and limit <= 0):
        raise ValueError(f"size ({size}) and limit ({limit}) must be positive")
    rows = read_captions(csv_path, caption_column)[:limit]
    missing = [name for name, _ in rows if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {csv_path} are not in {root}: {_some(missing)}; "
                                "copy them there or delete their rows")
    bad = _unreadable(root, [name for name, _ in rows])
    if bad:
        raise ValueError(f"{len(bad)} file(s) in {root} are not readable images: {_some(bad)}; replace them or "
                         "delete their rows from the captions CSV")
    return ImageCaptionFolder(root, rows, size)
