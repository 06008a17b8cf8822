"""Exploration: which data variant gives the small teacher a real few-step gap (in prompt accuracy)?

    python scripts/explore_teacher.py --variant place16 --out /tmp/x --device cuda

Trains a classifier, a VAE and the UNet + text encoder of ``helpers.small_model`` on a variant of the
digits (random placement / size / rotation on a 32×32 canvas), then measures prompt accuracy and PSNR
against 50-step DDIM for 50/8/4/2/1-step DDIM (trailing) at several guidance scales. Writes
``<out>/<variant>.json`` (and, with ``--save``, the pipeline and the classifier). Results and how the
reference run was tried on these teachers: docs/small_model.md, "Looking for a teacher with a 4-step accuracy
gap"; raw numbers in docs/small_model_exploration/. The shipped teacher is unchanged by it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import metrics
from helpers import small_model as sm
from helpers.commands import train_classifier as tc
from helpers.commands import train_small_model as tsm

@dataclass(frozen=True)
class Variant:
    """A digit variant: each digit drawn ``smin``-``smax`` px tall, rotated by up to ±``rot`` degrees, at a
    random place; ``copies`` draws per real digit; ``bg`` the background (see :func:`compose`), ``ink`` the
    range of the ink's contrast; ``latent_std`` the std the VAE's scaling factor gives the latents."""

    smin: int
    smax: int
    rot: float
    copies: int = 8
    bg: str = "none"
    ink: tuple[float, float] = (1.0, 1.0)
    latent_std: float = 1.0

    def draw(self, x01: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Grey digits (B, 1, 32, 32) in [0, 1] -> this variant's RGB images in [0, 1]."""
        return compose(place(x01, g, self.smin, self.smax, self.rot), g, self.bg, self.ink)


VARIANTS: dict[str, Variant | None] = {
    "base": None,  # the shipped recipe's data
    "bg12-20rot": Variant(12, 20, 25, bg="smooth", ink=(0.5, 1.0)),
    "bg10-16": Variant(10, 16, 0, bg="smooth", ink=(0.5, 1.0)),
    "bgfaint12-20rot": Variant(12, 20, 25, bg="smooth", ink=(0.25, 0.6)),
    "grain12-20rot": Variant(12, 20, 25, bg="grain", ink=(0.5, 1.0)),
    "place12-20rot-ls05": Variant(12, 20, 25, latent_std=0.5),
    "place20": Variant(20, 20, 0),
    "place16": Variant(16, 16, 0),
    "place12": Variant(12, 12, 0),
    "place12-20rot": Variant(12, 20, 25),
    "place10-16": Variant(10, 16, 0),
}


def place(x01: torch.Tensor, g: torch.Generator, smin: int, smax: int, rot_deg: float) -> torch.Tensor:
    """Grey digits (B, 1, 32, 32) in [0, 1] (the kit's upscaling) -> the same digits drawn at a random
    size in [smin, smax] px, a random rotation within ±rot_deg and a random position fully on the canvas."""
    b = x01.shape[0]
    s = smin + (smax - smin) * torch.rand(b, generator=g)
    k = 32.0 / s
    half = s / 32.0
    c = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - half).unsqueeze(1)
    a = (torch.rand(b, generator=g) * 2 - 1) * math.radians(rot_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = k * cos, -k * sin
    theta[:, 1, 0], theta[:, 1, 1] = k * sin, k * cos
    theta[:, :, 2] = -(theta[:, :, :2] @ c.unsqueeze(2)).squeeze(2)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def variant_data(name: str, seed: int = 0):
    """The data set of variant ``name``: images (N, 3, 32, 32) in [-1, 1], labels, and the :class:`Variant`."""
    x, y = sm.load_digits_dataset()
    spec = VARIANTS[name]
    if spec is None:
        return x, y, spec
    g = torch.Generator().manual_seed(seed)
    x01 = (x[:, :1] + 1) / 2
    xs = torch.cat([spec.draw(x01, g) for _ in range(spec.copies)])
    return xs * 2 - 1, y.repeat(spec.copies), spec


def compose(m: torch.Tensor, g: torch.Generator, bg: str, ink) -> torch.Tensor:
    """Digit masks (B, 1, 32, 32) in [0, 1] -> RGB images in [0, 1]: a background (none: black; smooth: a
    random colour field from a 4x4 grid; grain: smooth plus per-pixel grain) and the digit in a random
    ink colour, brighter than the background by a contrast drawn from ``ink``."""
    b = m.shape[0]
    if bg == "none":
        base = torch.zeros(b, 3, 32, 32)
        c = ink[0] + (ink[1] - ink[0]) * torch.rand(b, 1, 1, 1, generator=g)
        return (base + c * m).expand(-1, 3, -1, -1).clamp(0, 1)
    mean = 0.35 * torch.rand(b, 3, 1, 1, generator=g)
    field = F.interpolate(torch.rand(b, 3, 4, 4, generator=g) - 0.5, size=(32, 32), mode="bicubic", align_corners=False)
    base = mean + 0.45 * field
    if bg == "grain":
        base = base + 0.15 * F.interpolate(torch.randn(b, 3, 16, 16, generator=g), size=(32, 32), mode="nearest")
    base = base.clamp(0, 1)
    c = ink[0] + (ink[1] - ink[0]) * torch.rand(b, 1, 1, 1, generator=g)
    tint = 0.8 + 0.2 * torch.rand(b, 3, 1, 1, generator=g)
    inkc = (base.mean(dim=(1, 2, 3), keepdim=True) + c * tint).clamp(0, 1)
    return (base * (1 - m) + inkc * m).clamp(0, 1)


def train_variant_classifier(spec, device, seed=0, epochs=40):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = tc.digit_split(seed=0)
    if spec is not None:
        x_te = spec.draw(x_te, torch.Generator().manual_seed(99))
    model = metrics.DigitClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = 64
    steps = epochs * math.ceil(len(y_tr) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), bs):
            j = perm[i:i + bs]
            if spec is None:
                xb = tc._augment(x_tr[j], g)
            else:  # the variant already moves the digits: only the photometric part of the kit's augmentation
                xb = tc._photometric(spec.draw(x_tr[j], g).mean(dim=1, keepdim=True), g)
            xb = metrics._stretch(xb)
            loss = F.cross_entropy(model(xb.to(device)), y_tr[j].to(device), label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model = model.cpu().eval()
    return model, metrics.prompt_accuracy(x_te, y_te, classifier=model)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--save", action="store_true")
    p.add_argument("--unet-time-limit", type=float, default=None)
    a = p.parse_args()
    dev = a.device
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"variant": a.variant, "spec": VARIANTS[a.variant] and asdict(VARIANTS[a.variant]), "args": vars(a)}
    t0 = time.time()
    images, labels, spec = variant_data(a.variant)
    clf, clf_acc = train_variant_classifier(spec, dev)
    res["classifier_held_out"] = clf_acc
    res["classifier_s"] = round(time.time() - t0, 1)
    print(a.variant, "classifier", clf_acc, flush=True)
    tok = sm.build_tokenizer()
    vae, _ = tsm.train_vae(images, a.vae_steps, batch_size=128, device=dev)
    lm, ls = tsm.encode_dataset(vae, images)
    with torch.no_grad():
        rec = torch.cat([vae.decode(lm[i:i + 512]).sample for i in range(0, len(images), 512)]).cpu()
    res["vae_psnr"] = metrics.psnr_db((rec.clamp(-1, 1) + 1) / 2, (images + 1) / 2)
    res["real_acc_vae_rec"] = metrics.prompt_accuracy((rec.clamp(-1, 1) + 1) / 2, labels, classifier=clf)
    sampled = lm + ls * torch.randn(lm.shape, generator=torch.Generator(device=lm.device).manual_seed(0), device=lm.device)
    sf = (spec.latent_std if spec is not None else 1.0) / float(sampled.std())
    vae.register_to_config(scaling_factor=sf)
    print(a.variant, "vae", res["vae_psnr"], res["real_acc_vae_rec"], flush=True)
    t1 = time.time()
    unet, te, log, _ = tsm.train_unet(lm, ls, labels, sf, tok, a.unet_steps, a.batch_size, device=dev, log_every=500,
                                    time_limit_s=a.unet_time_limit)
    res["unet_s"] = round(time.time() - t1, 1)
    res["unet_log_tail"] = log[-3:]
    pipe = sm.assemble_pipeline(vae, te, tok, unet, sm.build_scheduler()).to(dev)
    pipe.set_progress_bar_config(disable=True)
    digits = [d for d in range(10) for _ in range(a.per_digit)]
    lat = torch.randn((len(digits), 4, 16, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    keep = {}
    for w in (2.0, 3.0, 5.0):
        ref = tsm.sample_digits(pipe, digits, w, 50, seed=0, template_index=None, latents=lat, batch_size=500)
        for n in (50, 4, 2, 1):
            imgs = ref if n == 50 else tsm.sample_digits(pipe, digits, w, n, seed=0, template_index=None,
                                                          latents=lat, batch_size=500)
            if w == 5.0:
                keep[n] = imgs[::10].clone()
            rows.append({"w": w, "steps": n, "acc": round(metrics.prompt_accuracy(imgs, digits, classifier=clf), 3),
                         "psnr": round(metrics.psnr_db(imgs, ref), 2), "sharp": round(metrics.sharpness(imgs), 4)})
            print(a.variant, rows[-1], flush=True)
    res["rows"] = rows
    torch.save(keep, out / f"{a.variant}-samples.pt")
    res["total_s"] = round(time.time() - t0, 1)
    (out / f"{a.variant}.json").write_text(json.dumps(res, indent=1))
    if a.save:
        pipe.to("cpu").save_pretrained(out / f"{a.variant}-pipe", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / f"{a.variant}-clf.safetensors"))


if __name__ == "__main__":
    main()
