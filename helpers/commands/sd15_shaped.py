"""Write an SD1.5-shaped random-weight pipeline folder and a generated image-caption folder.

    python -m helpers.commands.sd15_shaped --out DIR [--size full|small] [--dtype float32|float16] [--seed 0]
                                            [--data DIR --images N --image-size PIXELS]

``DIR`` gets a diffusers ``StableDiffusionPipeline`` (``save_pretrained``: SD1.5's configs for the UNet, the
VAE, the CLIP ViT-L/14 text tower and the DDIM scheduler, random weights, an offline byte-level tokenizer),
which loads with ``StableDiffusionPipeline.from_pretrained(DIR)``; ``--size small`` writes the tiny variant
of the same architecture (32x32 images) that tests use. With ``--data``, that folder gets ``--images``
generated images with captions (``metadata.csv``, ``docs/data.md``). Then run the SD1.5 path with
``CD_KIT_MODEL=DIR CD_KIT_DATA=DATA``. Random weights cost exactly the time and memory of the real ones, so
this times the SD1.5 path anywhere; its images are noise, its metrics mean nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from helpers.sd15_shaped import SIZES, image_size, model_configs, write_caption_folder, write_pipeline

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.commands.sd15_shaped",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="pipeline folder to write (must be empty or new)")
    parser.add_argument("--size", choices=SIZES, default="full", help="full: SD1.5's shape (default); small: tiny")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="weights' dtype on disk (the Hub's SD1.5 is float32; the kit loads fp16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the images")
    parser.add_argument("--device", default="cpu",
                        help="where the random weights are drawn: cpu (default) or cuda (seconds instead of a minute)")
    parser.add_argument("--data", type=Path, default=None, help="also write an image-caption folder here")
    parser.add_argument("--images", type=int, default=100, help="images in --data (default 100)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels per side of --data's images (default: the pipeline's, 512 full / 32 small)")
    args = parser.parse_args(argv)
    for path in filter(None, (args.out, args.data)):
        if _nonempty(path):
            print(f"error: {path} exists and is not empty; choose a new folder or delete it first", file=sys.stderr)
            return 2
    if args.images < 1:
        parser.error("--images must be at least 1")
    start = time.perf_counter()
    write_pipeline(args.out, args.size, args.seed, DTYPES[args.dtype], args.device)
    print(f"pipeline ({args.size}, {args.dtype}): {args.out} ({time.perf_counter() - start:.1f} s)")
    if args.data is not None:
        pixels = args.image_size or image_size(model_configs(args.size == "small"))
        write_caption_folder(args.data, args.images, pixels, args.seed)
        print(f"data: {args.images} images of {pixels} px with captions in {args.data}")
    print(f"use it: CD_KIT_MODEL={args.out.resolve()}"
          + (f" CD_KIT_DATA={args.data.resolve()}" if args.data is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
