"""Does the cosine learning-rate decay help or hurt the 150-step CD student (notebook 04's `cd_4`)?

    python scripts/explore_cd_schedule.py --out-dir /tmp/gap16-run [--steps 150] [--seeds 0]

Trains `cd` exactly as notebook 04 does (the reference functions of `solutions/`, `settings_for("small")`), once
per learning-rate schedule (constant, cosine) and training seed, and measures `consistency_sampling` at 4 steps
on the kit's evaluation set (500 images) against the teacher's DDIM-50 images, read from the cache of a reference
run's output folder (`--out-dir`, made if missing). Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from helpers import data, evaluation, training  # noqa: E402
from helpers.config import KitConfig  # noqa: E402
from helpers.models import load_course_pipeline, resolve_model  # noqa: E402
from helpers.notebook_functions import course_namespace  # noqa: E402
from helpers.prompts import empty_prompt_embeds  # noqa: E402
from helpers.seeding import seed_everything  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0")
    p.add_argument("--schedules", default="constant,cosine")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    ns = course_namespace(ROOT / "solutions", "04_consistency_loss")
    config = KitConfig.from_environ().replace(out=args.out_dir)
    spec = resolve_model("small")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for schedule in args.schedules.split(","):
            pipe = load_course_pipeline(config)
            settings = dataclasses.replace(training.settings_for("small"), lr_schedule=schedule)
            eval_set = evaluation.make_eval_set(pipe, spec, config)
            teacher50 = evaluation.teacher_reference(pipe, eval_set, spec.guidance_scale,
                                                     data.model_fingerprint(spec.source), config, batch_size=100)
            seed_everything(seed)
            teacher_unet = training.make_teacher(pipe.unet, settings)
            dataset = data.training_dataset(pipe, spec, settings, config)
            loader = data.training_dataloader(dataset, settings.batch_size)
            optimizer = training.start_phase(pipe.unet, "cd", settings, num_steps=args.steps)
            uncond = empty_prompt_embeds(pipe, settings.batch_size)
            xs = functools.partial(ns["get_xs_from_xt_with_teacher"], teacher_unet=teacher_unet,
                                   guidance_scale=settings.guidance_scale, uncond_prompt_embeds=uncond)
            loss = functools.partial(ns["cm_loss_template"], unet=pipe.unet, scheduler=pipe.scheduler,
                                     loss_fn=functools.partial(ns["pseudo_huber_loss"], c=settings.huber_c),
                                     get_boundary_timesteps=lambda s, **kw: torch.zeros_like(s), get_xs_from_xt=xs,
                                     step_size=settings.step_size)
            start = time.perf_counter()
            ns["train_loop"](pipe.unet, optimizer, loader, loss, num_steps=args.steps, gradient_accumulation_steps=1)
            seconds = time.perf_counter() - start
            pipe.unet.eval()
            result = evaluation.evaluate("cd_4", evaluation.function_sampler(ns["consistency_sampling"], pipe,
                                                                             num_inference_steps=4),
                                         eval_set, teacher50.images, config, batch_size=100, record=False)
            print(json.dumps({"seed": seed, "schedule": schedule, "steps": args.steps, "train_s": round(seconds, 1),
                              **{k: m.value for k, m in result.metrics.items() if m.value is not None}}), flush=True)


if __name__ == "__main__":
    main()
