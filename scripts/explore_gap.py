"""How much worse is the shipped teacher's few-step DDIM than its 50-step DDIM, and how sure are we?

    python scripts/explore_gap.py --guidance 5,7.5,10 --seeds 0,1,2,3,4 --per-digit 50 \
        [--steps 1,2,4,8,50] [--out docs/small_model_exploration/gap.json] [--cache out/explore_gap]

For each guidance scale and each evaluation seed (the initial latents of ``helpers.evaluation.make_eval_set``)
the teacher samples ``10 × per_digit`` images with DDIM (trailing timesteps, as the course does) at every step
count, all from the same latents and prompts. Each set is measured with

* ``accuracy``: prompt accuracy (the kit's digit classifier),
* ``fd_real``: Fréchet distance in the classifier's feature space (``helpers.fid.digit_features``) against the
  1,797 real digits,
* ``fd_50``: the same distance against the teacher's DDIM-50 images from the same noise,
* ``fd_50x``: the same distance against the DDIM-50 images of the *other* seeds (independent noise; the value
  DDIM-50 itself gets there is the floor), the comparison that is fair to samplers that draw fresh noise,
* ``fd_50h``: split halves of one set: the first half of each digit's images against DDIM-50 of the second half
  and the reverse, averaged (independent noise without a second set),
* ``psnr``: PSNR against those DDIM-50 images,

on nested subsets (the first ``n`` images of each digit, ``--subsets``), so that one run shows how the spread
over seeds shrinks with the number of images. The spread of a number is its standard deviation over the seeds;
``boot_sd`` is the bootstrap standard deviation of one seed's set (images resampled), the cheap estimate a single
run can report. Images are cached as uint8 under ``--cache`` so that a re-run only measures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import evaluation, metrics  # noqa: E402
from helpers import small_model as sm  # noqa: E402
from helpers.fid import digit_features, frechet_distance  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def load_teacher(folder: Path):
    from diffusers import StableDiffusionPipeline

    from helpers.models import use_trailing_ddim

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return use_trailing_ddim(pipe)


def images_for(pipe, eval_set, steps: int, guidance: float, cache: Path) -> torch.Tensor:
    """DDIM images of ``eval_set`` in [0, 1] (float), from the uint8 cache when there."""
    path = cache / f"g{guidance:g}-seed{eval_set.seed}-n{len(eval_set)}-steps{steps}.pt"
    if path.exists():
        return torch.load(path, weights_only=True).float() / 255
    images, _ = evaluation.generate(evaluation.pipeline_sampler(pipe, steps, guidance), eval_set, batch_size=100,
                                    desc=f"w={guidance:g} seed {eval_set.seed} DDIM-{steps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((images.clamp(0, 1) * 255).round().to(torch.uint8), path)
    return (images.clamp(0, 1) * 255).round() / 255  # measured exactly as a cached run measures


def subset_index(per_digit: int, n: int) -> torch.Tensor:
    """The first ``n`` images of each digit of a digit-major evaluation set with ``per_digit`` per digit."""
    return torch.tensor([d * per_digit + k for d in range(10) for k in range(n)])


def measure(images, feats, digits, ref_images, ref_feats, real_feats) -> dict:
    return {"accuracy": metrics.prompt_accuracy(images, digits),
            "fd_real": frechet_distance(feats, real_feats),
            "fd_50": frechet_distance(feats, ref_feats),
            "psnr": metrics.psnr_db(images, ref_images)}


def split_half_fd(feats: torch.Tensor, ref_feats: torch.Tensor, n: int) -> float:
    """FD of the first half of each digit's ``n`` images against DDIM-50 of the second half, and the reverse, averaged:
    an independent-noise reference inside one evaluation set (digit-major, ``n`` per digit)."""
    a = torch.tensor([d * n + k for d in range(10) for k in range(n // 2)])
    b = torch.tensor([d * n + k for d in range(10) for k in range(n // 2, 2 * (n // 2))])
    return 0.5 * (frechet_distance(feats[a], ref_feats[b]) + frechet_distance(feats[b], ref_feats[a]))


def bootstrap_sd(images, feats, digits, ref_images, ref_feats, real_feats, rounds: int, seed: int) -> dict:
    """Standard deviation of each number over ``rounds`` resamplings (with replacement, pairs kept) of the set."""
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    for _ in range(rounds):
        i = torch.randint(len(images), (len(images),), generator=gen)
        for k, v in measure(images[i], feats[i], digits[i], ref_images[i], ref_feats[i], real_feats).items():
            values.setdefault(k, []).append(v)
    return {k: statistics.stdev(v) for k, v in values.items()}


def summarise(rows: list[dict]) -> dict:
    keys = ("accuracy", "fd_real", "fd_50", "fd_50x", "fd_50h", "psnr")
    out = {}
    for k in (k for k in keys if k in rows[0]):
        vals = [r[k] for r in rows]
        out[k] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(sm.SMALL_MODEL_DIR))
    p.add_argument("--guidance", type=floats, default=[5.0, 7.5, 10.0])
    p.add_argument("--steps", type=ints, default=[1, 2, 4, 8, 50])
    p.add_argument("--seeds", type=ints, default=[0, 1, 2, 3, 4])
    p.add_argument("--per-digit", type=int, default=50)
    p.add_argument("--subsets", type=ints, default=[10, 20, 50], help="images per digit of the nested subsets")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap rounds per set (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="out/explore_gap")
    p.add_argument("--out", default="docs/small_model_exploration/gap.json")
    args = p.parse_args(argv)
    if 50 not in args.steps:
        raise SystemExit("--steps must include 50: every number is measured against DDIM-50")
    subsets = [n for n in args.subsets if n <= args.per_digit]

    torch.set_num_threads(args.threads)
    pipe = load_teacher(Path(args.model_dir))
    real, _ = sm.load_digits_dataset()
    real_feats = digit_features((real + 1) / 2)
    out_path, cache = Path(args.out), Path(args.cache)
    result: dict = {"command": "python scripts/explore_gap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "model_dir": os.path.relpath(args.model_dir, ROOT), "per_digit": args.per_digit,
                    "seeds": args.seeds, "steps": args.steps, "runs": {}, "summary": {},
                    "software": {"python": platform.python_version(), "torch": torch.__version__}}
    # the floor: real digits against themselves, two disjoint random halves of the same size as a subset
    gen = torch.Generator().manual_seed(0)
    result["real_vs_real_fd"] = {}
    for n in subsets:
        vals = []
        for _ in range(5):
            perm = torch.randperm(len(real_feats), generator=gen)
            vals.append(frechet_distance(real_feats[perm[:10 * n]], real_feats[perm[10 * n:20 * n]]))
        result["real_vs_real_fd"][str(10 * n)] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals)}
    start = time.perf_counter()
    all_feats: dict[tuple[float, int, int], torch.Tensor] = {}
    for w in args.guidance:
        for seed in args.seeds:
            eval_set = evaluation.make_eval_set(pipe, per_digit=args.per_digit, seed=seed)
            imgs = {s: images_for(pipe, eval_set, s, w, cache) for s in args.steps}
            feats = {s: digit_features(v) for s, v in imgs.items()}
            all_feats.update({(w, seed, s): f for s, f in feats.items()})
            for n in subsets:
                idx = subset_index(args.per_digit, n)
                digits = eval_set.digits[idx]
                for s in args.steps:
                    row = measure(imgs[s][idx], feats[s][idx], digits, imgs[50][idx], feats[50][idx], real_feats)
                    row["fd_50h"] = split_half_fd(feats[s][idx], feats[50][idx], n)
                    if args.bootstrap and n == subsets[-1]:
                        row["boot_sd"] = bootstrap_sd(imgs[s][idx], feats[s][idx], digits, imgs[50][idx],
                                                      feats[50][idx], real_feats, args.bootstrap, seed)
                    result["runs"].setdefault(f"w={w:g}", {}).setdefault(f"n={10 * n}", {}) \
                        .setdefault(f"ddim{s}", []).append({"seed": seed, **row})
            result["seconds"] = round(time.perf_counter() - start, 1)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive an interruption
    # against the DDIM-50 images of the *other* seeds (independent noise): the floor is DDIM-50's own value
    for w in args.guidance:
        for n in subsets:
            idx = subset_index(args.per_digit, n)
            for s in args.steps:
                for row in result["runs"][f"w={w:g}"][f"n={10 * n}"][f"ddim{s}"]:
                    others = [all_feats[(w, b, 50)][idx] for b in args.seeds if b != row["seed"]]
                    if others:
                        row["fd_50x"] = statistics.fmean(frechet_distance(all_feats[(w, row["seed"], s)][idx], o)
                                                         for o in others)
    for wkey, by_n in result["runs"].items():
        for nkey, by_s in by_n.items():
            result["summary"].setdefault(wkey, {})[nkey] = {s: summarise(rows) for s, rows in by_s.items()}
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    for wkey, by_n in result["summary"].items():
        for nkey, by_s in by_n.items():
            print(f"\n{wkey} {nkey} (mean ± sd over {len(args.seeds)} seeds)")
            for s, m in by_s.items():
                print(f"  {s:<7} acc {m['accuracy']['mean']:.3f}±{m['accuracy']['sd']:.3f}  "
                      f"FD-real {m['fd_real']['mean']:7.3f}±{m['fd_real']['sd']:.3f}  "
                      f"FD-50 {m['fd_50']['mean']:7.3f}±{m['fd_50']['sd']:.3f}  "
                      + (f"FD-50x {m['fd_50x']['mean']:7.3f}±{m['fd_50x']['sd']:.3f}  " if 'fd_50x' in m else "")
                      + f"FD-50h {m['fd_50h']['mean']:7.3f}±{m['fd_50h']['sd']:.3f}  "
                      + f"PSNR {m['psnr']['mean']:6.2f}±{m['psnr']['sd']:.2f}")
    print(f"\nreal vs real FD: {result['real_vs_real_fd']}\nwrote {out_path} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
