"""Measure the kit's shipped small teacher (digits-sd) on the CPU, with fixed seeds.

    python scripts/eval_small_model.py [--out docs/small_model_eval.json] [--per-digit 20] [--seed 0]

(a) 50-step DDIM at the recommended guidance scale, ``--per-digit`` samples per digit (prompts cycle
    through all templates): prompt accuracy (digit classifier of ``helpers.metrics``) and sharpness;
(b) 4-step DDIM (trailing timesteps 999, 749, 499, 249) from the SAME initial latents and prompts:
    prompt accuracy, sharpness and PSNR against (a) — the gap the course's students close;
(c) pipeline load time on the CPU and wall time of a 50-step generation of 4 images (median of
    ``--repeats`` runs after a warm-up, ``torch.set_num_threads(--threads)``).

Prints a table, writes JSON to ``--out`` and an image grid (50-step rows above 4-step rows, same noise
column by column) to ``--grid``.
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
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import metrics  # noqa: E402
from helpers import small_model as sm  # noqa: E402
from helpers.device import cpu_name  # noqa: E402
from helpers.models import use_trailing_ddim  # noqa: E402


def load_pipeline(folder: Path):
    # lazy: main() times the import of diffusers and transformers on its own (the "import" figure)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return use_trailing_ddim(pipe)  # the folder ships SD1.5's PNDM scheduler; the course samples with DDIM


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
             batch_size: int = 100) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] from the given initial latents with ``steps`` DDIM steps."""
    out = []
    for i in range(0, len(prompts), batch_size):
        res = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents[i:i + batch_size].clone(), output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, titles: list[str]) -> None:
    """One labelled row of images per entry of ``rows``."""
    ncols = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.1 * ncols, 1.25 * len(rows) + 0.3), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("digits-sd: 50-step DDIM (top rows) vs 4-step DDIM (bottom rows), same initial noise per column",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Evaluate the kit's small digits teacher on the CPU.")
    p.add_argument("--model-dir", default=str(sm.SMALL_MODEL_DIR))
    p.add_argument("--out", default="docs/small_model_eval.json")
    p.add_argument("--grid", default="docs/small_model_samples.png")
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="default: kit_model.json's recommended scale")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs for the medians")
    p.add_argument("--extra-steps", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 2, 4, 8, 50],
                   help="DDIM step counts for the steps table (comma-separated)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    folder = Path(args.model_dir)
    kit = json.loads((folder / "kit_model.json").read_text())
    guidance = args.guidance if args.guidance is not None else float(kit["recommended_guidance_scale"])

    # (c1) load time: one warm-up load (imports, file cache), then the median of timed loads
    t0 = time.perf_counter()
    # lazy: timed here, apart from the load (diffusers and transformers load their modules on first use)
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    import_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_pipeline(folder)
    first_load = time.perf_counter() - t0
    load_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pipe = load_pipeline(folder)
        load_times.append(time.perf_counter() - t0)

    # (a) + (b) the same prompts and initial latents for 50 and 4 steps
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    prompts = [sm.digit_prompt(d, i) for i, d in enumerate(digits)]  # templates cycle with the index
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn((len(digits), sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE), generator=g)
    t0 = time.perf_counter()
    imgs50 = generate(pipe, prompts, latents, 50, guidance)
    t50 = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs4 = generate(pipe, prompts, latents, 4, guidance)
    t4 = time.perf_counter() - t0

    real, real_labels = sm.load_digits_dataset()
    real = (real + 1) / 2
    pred50 = metrics.classify_digits(imgs50)
    pred4 = metrics.classify_digits(imgs4)
    target = torch.tensor(digits)
    per_digit = {str(d): {"acc50": round(float((pred50[target == d] == d).float().mean()), 3),
                          "acc4": round(float((pred4[target == d] == d).float().mean()), 3)} for d in range(10)}
    n_t = len(sm.PROMPT_TEMPLATES)
    tidx = torch.arange(len(digits)) % n_t
    per_template = {sm.PROMPT_TEMPLATES[i]: {"acc50": round(float((pred50[tidx == i] == target[tidx == i]).float().mean()), 3),
                                             "acc4": round(float((pred4[tidx == i] == target[tidx == i]).float().mean()), 3)}
                    for i in range(n_t)}
    res50 = {"num_inference_steps": 50, "prompt_accuracy": round(metrics.prompt_accuracy(imgs50, digits), 4),
             "sharpness": round(metrics.sharpness(imgs50), 4), "seconds_all_samples": round(t50, 1)}
    res4 = {"num_inference_steps": 4, "prompt_accuracy": round(metrics.prompt_accuracy(imgs4, digits), 4),
            "sharpness": round(metrics.sharpness(imgs4), 4), "psnr_db_vs_50_step": round(metrics.psnr_db(imgs4, imgs50), 2),
            "seconds_all_samples": round(t4, 1)}

    # how the gap depends on the number of DDIM steps (same latents and prompts)
    steps_table = []
    for n in args.extra_steps:
        imgs_n = imgs4 if n == 4 else (imgs50 if n == 50 else generate(pipe, prompts, latents, n, guidance))
        steps_table.append({"num_inference_steps": n, "prompt_accuracy": round(metrics.prompt_accuracy(imgs_n, digits), 4),
                            "sharpness": round(metrics.sharpness(imgs_n), 4),
                            "psnr_db_vs_50_step": round(metrics.psnr_db(imgs_n, imgs50), 2)})

    # (c2) wall time of a 50-step generation of 4 images (one prompt, 4 images per prompt)
    def gen4(seed: int):
        return pipe(sm.digit_prompt(7), num_images_per_prompt=4, num_inference_steps=50, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="pil").images

    gen4(0)
    gen_times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        gen4(r + 1)
        gen_times.append(time.perf_counter() - t0)

    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    clf_info = json.loads(metrics.CLASSIFIER_INFO_PATH.read_text()) if metrics.CLASSIFIER_INFO_PATH.exists() else {}
    result = {
        "model": kit.get("name", "digits-sd"),
        "model_dir": os.path.relpath(folder, ROOT) if folder.is_relative_to(ROOT) else str(folder),
        "command": "python scripts/eval_small_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "guidance_scale": guidance,
        "samples": len(digits),
        "seed": args.seed,
        "prompts": "digit_prompt(d, i) for the i-th sample: all templates in turn, per_digit samples of each digit",
        "ddim_50": res50,
        "ddim_4": res4,
        "accuracy_gap_points": round(100 * (res50["prompt_accuracy"] - res4["prompt_accuracy"]), 1),
        "real_data": {"sharpness": round(metrics.sharpness(real), 4),
                      "classifier_accuracy_all_real": round(metrics.prompt_accuracy(real, real_labels), 4)},
        "classifier_held_out_accuracy": clf_info.get("held_out_accuracy"),
        "ddim_steps_table": steps_table,
        "per_digit": per_digit,
        "per_template": per_template,
        "import_seconds_diffusers_transformers": round(import_seconds, 3),
        "load_seconds_first_in_process": round(first_load, 3),
        "load_seconds_median": round(statistics.median(load_times), 3),
        "load_seconds_all": [round(t, 3) for t in load_times],
        "generate_4_images_50_steps_seconds_median": round(statistics.median(gen_times), 3),
        "generate_4_images_50_steps_seconds_all": [round(t, 3) for t in gen_times],
        "folder_size_mb": round(size_mb, 2),
        "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "software": {"python": platform.python_version(), "torch": torch.__version__},
    }

    rows = [("metric", "50-step DDIM", "4-step DDIM")]
    rows.append(("prompt accuracy", f"{res50['prompt_accuracy']:.3f}", f"{res4['prompt_accuracy']:.3f}"))
    rows.append(("sharpness (real %.3f)" % result["real_data"]["sharpness"], f"{res50['sharpness']:.4f}",
                 f"{res4['sharpness']:.4f}"))
    rows.append(("PSNR vs 50-step (dB)", "-", f"{res4['psnr_db_vs_50_step']:.2f}"))
    print(f"\ndigits-sd, guidance {guidance}, {len(digits)} samples, seed {args.seed}")
    for r in rows:
        print(f"  {r[0]:<26}{r[1]:>14}{r[2]:>14}")
    print("  DDIM steps:  " + "  ".join(f"{r['num_inference_steps']}: acc {r['prompt_accuracy']:.3f} / "
                                        f"{r['psnr_db_vs_50_step']:.1f} dB" for r in steps_table))
    print(f"  load time (median of {args.repeats}): {result['load_seconds_median']:.3f} s "
          f"(first in the process: {first_load:.3f} s; imports before it: {import_seconds:.2f} s)")
    print(f"  50-step generation of 4 images (median of {args.repeats}): "
          f"{result['generate_4_images_50_steps_seconds_median']:.3f} s")
    print(f"  folder size: {size_mb:.2f} MB")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    # grid: two samples of each digit, 50-step rows then 4-step rows
    cols = [d * args.per_digit + k for k in range(2) for d in range(10)]
    titles = [f"digit {digits[i]}" for i in cols[:10]]
    save_grid([("50 steps", imgs50[cols[:10]]), ("50 steps", imgs50[cols[10:]]),
               ("4 steps", imgs4[cols[:10]]), ("4 steps", imgs4[cols[10:]])], Path(args.grid), titles)
    print(f"Wrote {out} and {args.grid}")
    return result


if __name__ == "__main__":
    main()
