"""Do the course's distilled students beat the shipped teacher's few-step DDIM? (CPU exploration)

    python scripts/explore_students.py --phase multi_cd --guidance 7.5 --steps 400 --checkpoints 200,400 \
        [--boundaries 4] [--lr 1e-3] [--seeds 0,1,2] [--per-digit 20] [--cache out/explore_gap]

Trains one student the way notebooks 04/05 do (the reference functions of ``solutions/`` via
``helpers.notebook_functions``, ``helpers.training.settings_for("small")`` with the guidance, learning rate and
number of steps given here) and, at each checkpoint, samples it on the evaluation sets of
``scripts/explore_gap.py`` (its cached teacher images must exist for the same guidance, seeds and ``--per-digit``):
``multi_cd`` with the matched deterministic sampler (``multi_boundary_sampling``, K = ``--boundaries``), ``cd``
with ``consistency_sampling`` in ``--boundaries`` steps. Each checkpoint reports, per seed and as mean ± sd, the same
numbers as the teacher's DDIM rows (accuracy, FD against real digits and against DDIM-50, PSNR against DDIM-50) and
the paired difference to the teacher's DDIM at the same number of steps; ``fd_50x`` is the FD against the DDIM-50
images of the *other* seeds (independent noise), fair to samplers that draw fresh noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from explore_gap import floats, ints, load_teacher, measure, subset_index  # noqa: E402
from helpers import data, evaluation, training  # noqa: E402
from helpers import small_model as sm  # noqa: E402
from helpers.config import KitConfig  # noqa: E402
from helpers.fid import digit_features, frechet_distance  # noqa: E402
from helpers.models import resolve_model  # noqa: E402
from helpers.notebook_functions import course_namespace  # noqa: E402
from helpers.prompts import empty_prompt_embeds  # noqa: E402
from helpers.seeding import seed_everything  # noqa: E402


def cached(cache: Path, guidance: float, seed: int, n: int, steps: int) -> torch.Tensor:
    path = cache / f"g{guidance:g}-seed{seed}-n{n}-steps{steps}.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run scripts/explore_gap.py with --guidance {guidance:g} --seeds {seed} "
                         f"--per-digit {n // 10} first")
    return torch.load(path, weights_only=True).float() / 255


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["multi_cd", "cd"], default="multi_cd")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--checkpoints", type=ints, default=None, help="default: the last step only")
    p.add_argument("--boundaries", type=int, default=4, help="K of multi_cd, and the sampling steps")
    p.add_argument("--lr", type=float, default=None, help="default: the small model's setting")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cosine", action="store_true", help="learning rate cosine-decayed to 0 over --steps")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--per-digit", type=int, default=50, help="of the cached evaluation sets")
    p.add_argument("--eval-per-digit", type=int, default=20, help="images per digit measured (a nested subset)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="out/explore_gap")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache, n_all = Path(args.cache), 10 * args.per_digit
    checkpoints = sorted(set(args.checkpoints or [args.steps]) | {args.steps})

    ns = course_namespace(ROOT / "solutions", "05_multi_boundary")
    spec = resolve_model("small")
    pipe = load_teacher(Path(spec.source))
    settings = training.settings_for("small")
    settings = dataclasses.replace(settings, guidance_scale=args.guidance,
                                   learning_rate=args.lr or settings.learning_rate,
                                   batch_size=args.batch_size or settings.batch_size)
    config = KitConfig.from_environ()
    seed_everything(0)
    teacher_unet = training.make_teacher(pipe.unet, settings)
    dataset = data.training_dataset(pipe, spec, settings, config)
    loader = data.training_dataloader(dataset, settings.batch_size)
    optimizer = training.start_phase(pipe.unet, args.phase, settings)
    uncond = empty_prompt_embeds(pipe, settings.batch_size)
    teacher_xs = functools.partial(ns["get_xs_from_xt_with_teacher"], teacher_unet=teacher_unet,
                                   guidance_scale=settings.guidance_scale, uncond_prompt_embeds=uncond)
    if args.phase == "multi_cd":
        boundary = functools.partial(ns["get_multi_boundary_timesteps"], num_boundaries=args.boundaries)
        sampler_fn, kwargs = ns["multi_boundary_sampling"], {"num_boundaries": args.boundaries}
    else:
        boundary = lambda s, **kw: torch.zeros_like(s)  # noqa: E731  (notebook 04's zero boundary)
        sampler_fn, kwargs = ns["consistency_sampling"], {"num_inference_steps": args.boundaries}
    loss = functools.partial(ns["cm_loss_template"], unet=pipe.unet, scheduler=pipe.scheduler,
                             loss_fn=functools.partial(ns["pseudo_huber_loss"], c=settings.huber_c),
                             get_boundary_timesteps=boundary, get_xs_from_xt=teacher_xs, step_size=settings.step_size)

    if args.cosine:  # one loss call per optimizer step (no accumulation): set the rate of the coming step
        base_lr, calls, plain_loss = settings.learning_rate, [0], loss

        def loss(*batch):
            for group in optimizer.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * min(calls[0], args.steps) / args.steps))
            calls[0] += 1
            return plain_loss(*batch)

    real, _ = sm.load_digits_dataset()
    real_feats = digit_features((real + 1) / 2)
    idx = subset_index(args.per_digit, args.eval_per_digit)
    sets = {}
    for seed in args.seeds:
        es = evaluation.make_eval_set(pipe, per_digit=args.per_digit, seed=seed)
        ref = cached(cache, args.guidance, seed, n_all, 50)[idx]
        ddim = cached(cache, args.guidance, seed, n_all, args.boundaries)[idx]
        sets[seed] = (es, ref, digit_features(ref), ddim, digit_features(ddim))
    result = {"command": "python scripts/explore_students.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": settings.as_dict(), "checkpoints": {}}
    done, train_seconds = 0, 0.0
    for ckpt in checkpoints:
        start = time.perf_counter()
        ns["train_loop"](pipe.unet, optimizer, loader, loss, num_steps=ckpt - done,
                         gradient_accumulation_steps=settings.gradient_accumulation_steps)
        train_seconds += time.perf_counter() - start
        done = ckpt
        pipe.unet.eval()
        rows = []
        for seed, (es, ref, ref_f, ddim, ddim_f) in sets.items():
            sub = evaluation.EvalSet([es.prompts[i] for i in idx], es.digits[idx], es.latents[idx], seed)
            images, _ = evaluation.generate(evaluation.function_sampler(sampler_fn, pipe, seed=seed, **kwargs), sub,
                                            batch_size=100, progress=False)
            images = (images.clamp(0, 1) * 255).round() / 255
            feats = digit_features(images)
            student = measure(images, feats, sub.digits, ref, ref_f, real_feats)
            teacher = measure(ddim, ddim_f, sub.digits, ref, ref_f, real_feats)
            # against the DDIM-50 images of the other seeds (independent noise: fair to stochastic samplers)
            others = [v[2] for s, v in sets.items() if s != seed]
            if others:
                student["fd_50x"] = statistics.fmean(frechet_distance(feats, o) for o in others)
                teacher["fd_50x"] = statistics.fmean(frechet_distance(ddim_f, o) for o in others)
            rows.append({"seed": seed, **student, **{f"{k}_minus_ddim": student[k] - teacher[k] for k in student}})
        summary = {k: {"mean": statistics.fmean(r[k] for r in rows),
                       "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0} for k in rows[0] if k != "seed"}
        result["checkpoints"][str(ckpt)] = {"train_seconds": round(train_seconds, 1), "rows": rows, "summary": summary}
        print(f"{args.phase} w={args.guidance:g} step {ckpt} ({train_seconds:.0f} s): " + "  ".join(
            f"{k} {v['mean']:.3f}±{v['sd']:.3f}" for k, v in summary.items()), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
