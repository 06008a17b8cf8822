#!/usr/bin/env python
"""Is the kit's CPU work robust to load? OMP_WAIT_POLICY=PASSIVE against PyTorch's default (spinning OpenMP threads),
on a quiet machine and with ``--busy`` other processes spinning on the cores.

The workload is what the reference run's kernels spend most of their time on: the shipped teacher's 50-step DDIM
with classifier-free guidance over a batch of evaluation prompts (and, with ``--train``, LoRA training steps of
notebook 04's shape). Each measurement runs in a fresh process, since the policy is read when torch starts.

    python scripts/bench_omp.py --out docs/bench/omp_wait_policy.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CHILD = r'''
import time, torch
from helpers.config import KitConfig
from helpers.models import load_course_pipeline
from helpers import training
pipe = load_course_pipeline(KitConfig(model="small", device="cpu"))
s = training.settings_for("small")
opt = training.start_phase(pipe.unet, "cd", s)
lat = torch.randn(s.batch_size, 4, 16, 16)
emb = pipe.encode_prompt(["a handwritten digit 3"] * s.batch_size, "cpu", 1, False)[0].detach()
def step():
    t = torch.randint(0, 1000, (s.batch_size,))
    loss = pipe.unet(lat, t, encoder_hidden_states=emb).sample.pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
for _ in range(3): step()
t0 = time.perf_counter()
for _ in range({images}): step()
print(round(time.perf_counter() - t0, 2))
'''
CHILD = r'''
import time, torch
from helpers.config import KitConfig
from helpers.models import load_course_pipeline
pipe = load_course_pipeline(KitConfig(model="small", device="cpu"))
prompts = [f"a handwritten digit {i % 10}" for i in range({images})]
pipe(prompts[:4], num_inference_steps=2, guidance_scale=7.5)  # warm-up
t = time.perf_counter()
pipe(prompts, num_inference_steps=50, guidance_scale=7.5, output_type="pt")
print(round(time.perf_counter() - t, 2))
'''


def spin() -> None:
    while True:
        pass


def measure(policy: str, busy: int, images: int, child: str = CHILD) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    policy = None if policy == "default" else policy
    if policy and "," in policy:  # several variables, e.g. OMP_NUM_THREADS=1,OMP_WAIT_POLICY=PASSIVE
        for item in policy.split(","):
            name, value = item.split("=", 1)
            env[name] = value
    elif policy and "=" in policy:  # e.g. GOMP_SPINCOUNT=10000: spin briefly, then sleep
        name, value = policy.split("=", 1)
        env[name] = value
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT)
    spinners = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        out = subprocess.run([sys.executable, "-c", child.replace("{images}", str(images))], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
    finally:
        for p in spinners:
            p.terminate()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--workload", choices=("ddim", "train"), default="ddim",
                   help="ddim: 50-step DDIM of --images prompts; train: --images training steps of batch 32 (LoRA)")
    p.add_argument("--busy", type=int, default=2, help="spinning processes for the contended case")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--policies", nargs="+", default=["default", "PASSIVE", "GOMP_SPINCOUNT=10000"],
                   help="default (PyTorch's), an OMP_WAIT_POLICY value, or NAME=VALUE of another variable")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for busy in (0, args.busy):
        for policy in args.policies:
            child = TRAIN_CHILD if args.workload == "train" else CHILD
            times = [measure(policy, busy, args.images, child) for _ in range(args.repeats)]
            rows.append({"policy": policy, "busy_processes": busy, "seconds": times,
                         "best_s": min(times)})
            print(f"busy={busy} policy={policy}: {times} s", flush=True)
    what = (f"{args.images} LoRA training steps (batch 32) of the shipped UNet" if args.workload == "train" else
            f"50-step DDIM, guidance 7.5, {args.images} images, shipped teacher")
    result = {"what": what + ", CPU", "workload": args.workload,
              "cores": os.cpu_count(), "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%MZ"),
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
