"""The shipped small teacher (helpers/assets/digits-sd): SD1.5's classes, offline loading, determinism,
the offline tokenizer, prompts and data."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective if torch is not loaded yet

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import small_model as sm  # noqa: E402

FOLDER = sm.SMALL_MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    p = StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def kit() -> dict:
    return json.loads((FOLDER / "kit_model.json").read_text())


def test_folder_loads_offline_in_a_fresh_process():
    code = textwrap.dedent(f"""
        import torch
        from diffusers import StableDiffusionPipeline
        p = StableDiffusionPipeline.from_pretrained({str(FOLDER)!r}, safety_checker=None,
                                                    requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        img = p("a handwritten digit 3", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 3, 32, 32), img.shape
        print("OK", type(p.unet).__name__, type(p.vae).__name__, type(p.text_encoder).__name__,
              type(p.tokenizer).__name__, type(p.scheduler).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK UNet2DConditionModel AutoencoderKL CLIPTextModel CLIPTokenizer PNDMScheduler" in out.stdout


def test_folder_is_safetensors_only_and_small():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3  # unet, vae, text_encoder
    assert sum(f.stat().st_size for f in files) <= 20_000_000
    for name in ("model_index.json", "kit_model.json", "training_log.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "tokenizer/tokenizer.json"):
        assert (FOLDER / name).exists(), name
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_parts_are_sd15_classes_with_sd15_schedule(pipe):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    # Like SD1.5 the folder ships PNDM with "leading" spacing: swapping in DDIM "trailing" is task 01.
    assert isinstance(pipe.scheduler, PNDMScheduler)
    cfg = pipe.scheduler.config
    assert cfg.timestep_spacing == "leading"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset"):
        assert cfg[key] == sm.SD15_SCHEDULER_CONFIG[key], key
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == sm.IMAGE_SIZE
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_vae_scaling_factor_gives_unit_variance_latents(pipe):
    images, _ = sm.load_digits_dataset()
    with torch.no_grad():
        z = pipe.vae.encode(images[:256]).latent_dist.sample(torch.Generator().manual_seed(0))
    std = float((z * pipe.vae.config.scaling_factor).std())
    assert 0.8 < std < 1.25, std


def test_kit_model_json(kit):
    assert kit["name"] == "digits-sd" and kit["image_size"] == 32
    assert kit["recommended_guidance_scale"] >= 1.0
    assert kit["prompt_templates"] == list(sm.PROMPT_TEMPLATES)
    assert "load_digits" in kit["data"]
    log = json.loads((FOLDER / "training_log.json").read_text())
    assert log["wall_time_s"] > 0 and "torch" in log["software"]


def test_generation_is_deterministic_for_a_seed(pipe, kit):
    def run(seed):
        return pipe(["a handwritten digit 4", "the number one, handwritten"], num_inference_steps=4,
                    guidance_scale=kit["recommended_guidance_scale"], output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 32, 32) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05


def test_shipped_weights_draw_the_prompted_digit(pipe, kit):
    from helpers.metrics import prompt_accuracy

    digits = list(range(10)) * 2
    latents = torch.randn((len(digits), 4, 16, 16), generator=torch.Generator().manual_seed(5))
    images = pipe([sm.digit_prompt(d, i) for i, d in enumerate(digits)], num_inference_steps=20,
                  guidance_scale=kit["recommended_guidance_scale"], latents=latents, output_type="pt").images
    assert prompt_accuracy(images, digits) >= 0.8


@pytest.mark.parametrize("prompt", ["", "a handwritten digit 7", "the number seven, handwritten",
                                    "A sad puppy with LARGE eyes!!", "ünïcödé 日本語 🙂 tabs\tand\nnewlines",
                                    "word " * 200])
def test_tokenizer_handles_any_prompt(pipe, prompt):
    tok = pipe.tokenizer
    enc = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    ids = enc.input_ids[0]
    assert ids.shape == (77,)
    assert int(ids[0]) == tok.bos_token_id
    assert tok.eos_token_id in ids.tolist()
    assert int(ids.max()) < pipe.text_encoder.config.vocab_size and int(ids.min()) >= 0
    unk = [i for i in tok(prompt).input_ids[1:-1] if i == tok.unk_token_id]
    assert not unk  # byte-level fallback: nothing is unknown
    with torch.no_grad():
        emb = pipe.text_encoder(enc.input_ids)[0]
    assert emb.shape == (1, 77, pipe.text_encoder.config.hidden_size) and torch.isfinite(emb).all()


def test_tokenizer_pieces_and_empty_prompt(pipe):
    tok = pipe.tokenizer
    assert tok.convert_ids_to_tokens(tok("a handwritten digit 7").input_ids)[1:-1] == \
        ["a</w>", "handwritten</w>", "digit</w>", "7</w>"]
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert tok.decode(tok("The Digit Seven").input_ids, skip_special_tokens=True) == "the digit seven"


def test_tokenizer_rebuilds_identically_and_from_vocab_files(pipe, tmp_path):
    from transformers import CLIPTokenizer

    rebuilt = sm.build_tokenizer(tmp_path)
    assert rebuilt.get_vocab() == pipe.tokenizer.get_vocab()
    shipped = FOLDER / "tokenizer"
    vocab = json.loads((shipped / "vocab.json").read_text())
    assert vocab == pipe.tokenizer.get_vocab()
    merges = [tuple(line.split(" ")) for line in (shipped / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
              if line]
    from_files = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    for p in ("the number nine, handwritten", "", "a photo of a 0"):
        assert from_files(p).input_ids == pipe.tokenizer(p).input_ids


def test_digit_prompt():
    assert sm.digit_prompt(7) == "a handwritten digit 7"
    assert sm.digit_prompt(7, 1) == "the number seven, handwritten"
    for d in range(10):
        for i in range(len(sm.PROMPT_TEMPLATES)):
            p = sm.digit_prompt(d, i)
            assert str(d) in p or sm.DIGIT_WORDS[d] in p
    assert len(sm.PROMPT_TEMPLATES) >= 3
    assert any("{w}" in t for t in sm.PROMPT_TEMPLATES) and any("{n}" in t for t in sm.PROMPT_TEMPLATES)
    a = [sm.digit_prompt(3, rng=random.Random(0)) for _ in range(3)]
    assert a == [sm.digit_prompt(3, rng=random.Random(0)) for _ in range(3)]
    rng = np.random.default_rng(0)
    assert len({sm.digit_prompt(3, rng=rng) for _ in range(50)}) > 1
    with pytest.raises(ValueError):
        sm.digit_prompt(10)


def test_digits_dataset():
    x, y = sm.load_digits_dataset()
    assert x.shape == (1797, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert y.dtype == torch.int64 and sorted(set(y.tolist())) == list(range(10))
