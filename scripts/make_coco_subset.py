"""Build the SD1.5 training folder from a local COCO download: N random train2014 images, one caption each.

    python scripts/make_coco_subset.py --annotations annotations/captions_train2014.json \
        --images train2014 --out data/coco5k [--n 5000] [--size 512] [--seed 0]

Reads the COCO captions annotation file and the image folder you downloaded yourself (docs/data.md says
from where); downloads nothing. Writes ``--out`` in the layout :func:`helpers.captions_data.load_image_caption_folder`
reads: the images (centre-cropped and resized to ``--size`` as JPEG, or copied unchanged with ``--size 0``)
and ``metadata.csv`` (``file_name,text``). The choice of images and captions depends only on ``--seed``.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from helpers.captions_data import DEFAULT_CSV, center_crop_resize


def pick_pairs(annotations: dict, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` random ``(file_name, caption)`` pairs, one caption per image, from a COCO captions file's JSON."""
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in annotations["annotations"]:
        captions[ann["image_id"]].append(" ".join(ann["caption"].split()))  # COCO captions carry stray newlines
    images = sorted((img["id"], img["file_name"]) for img in annotations["images"] if captions.get(img["id"]))
    if n > len(images):
        raise ValueError(f"asked for {n} images but the annotations caption only {len(images)}")
    rng = random.Random(seed)
    return [(name, rng.choice(captions[image_id])) for image_id, name in rng.sample(images, n)]


def write_folder(pairs: list[tuple[str, str]], images_dir: Path, out: Path, size: int) -> None:
    """Copy (``size`` 0) or centre-crop + resize the images into ``out`` and write its ``metadata.csv``."""
    missing = [name for name, _ in pairs if not (images_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} chosen images are not in {images_dir} (e.g. {missing[:3]}): "
                                "point --images at the unzipped train2014 folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, caption) in enumerate(pairs):
        target = out / (name if size == 0 else Path(name).with_suffix(".jpg").name)
        if size == 0:
            shutil.copyfile(images_dir / name, target)
        else:
            with Image.open(images_dir / name) as image:
                center_crop_resize(image, size).save(target, quality=95)
        rows.append((target.name, caption))
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{len(pairs)} images", flush=True)
    with open(out / DEFAULT_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, type=Path, help="captions_train2014.json")
    parser.add_argument("--images", required=True, type=Path, help="the unzipped train2014/ image folder")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (e.g. data/coco5k)")
    parser.add_argument("--n", type=int, default=5000, help="number of image-caption pairs (default 5000)")
    parser.add_argument("--size", type=int, default=512, help="square side in pixels; 0 copies the originals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        annotations = json.loads(args.annotations.read_text(encoding="utf-8"))
        pairs = pick_pairs(annotations, args.n, args.seed)
        write_folder(pairs, args.images, args.out, args.size)
    except KeyError as err:
        print(f"error: {args.annotations} is not a COCO captions annotation file (no {err} key): use "
              "annotations/captions_train2014.json", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(pairs)} image-caption pairs to {args.out} (load them with "
          f"helpers.captions_data.load_image_caption_folder({str(args.out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
