"""Compiling the evaluation's sampling (``CD_KIT_EVAL_COMPILE``, :func:`helpers.evaluation.compile_choice`): who
decides, equal batch shapes with the padding dropped, and compiled sampling computing what eager sampling does.
The speed is measured on the GPU (``scripts/profile_course.py --plan compile``, docs/benchmarks.md), not here."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

from autograder.reference import reference
from helpers import evaluation, training
from helpers.config import KitConfig
from helpers.fakes import tiny_pipeline

SMALL = training.settings_for("small")


def test_even_batches_split_the_images_into_the_fewest_equal_calls():
    assert evaluation.even_batches(100, 64) == 50, "2 calls of 50, not 64 + 36"
    assert evaluation.even_batches(5000, 64) == 64
    assert evaluation.even_batches(120, 64) == 60
    assert evaluation.even_batches(7, 100) == 7
    assert evaluation.even_batches(7, 3) == 3, "3 + 3 + 1 (padded to 3)"


def _gpu_pipe(sample_size: int = 64):
    unet = SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(sample_size=sample_size))
    return SimpleNamespace(unet=unet)


def test_compile_choice_follows_the_setting_then_the_card_and_the_images(monkeypatch, make_config):
    monkeypatch.setattr(evaluation, "gpu_memory_gib", lambda device=None: 141.0)
    auto, many = make_config(), evaluation.COMPILE_FROM_IMAGES
    assert evaluation.compile_choice(_gpu_pipe(), many, auto) == evaluation.AUTO_COMPILE
    assert evaluation.compile_choice(_gpu_pipe(), many - 1, auto) == "off", "too few images to pay the compile back"
    assert evaluation.compile_choice(_gpu_pipe(), 4, make_config(eval_compile="vae")) == "vae", "the setting wins"
    assert evaluation.compile_choice(_gpu_pipe(), many, make_config(eval_compile="off")) == "off"
    assert evaluation.compile_choice(_gpu_pipe(sample_size=16), many, make_config(eval_compile="all")) == "off", (
        "the kit's small digits model is never compiled")
    assert evaluation.compile_choice(tiny_pipeline(), many, make_config(eval_compile="all")) == "off", "not on a CPU"
    assert evaluation.compile_choice(None, many, make_config(eval_compile="all")) == "off"
    monkeypatch.setattr(evaluation, "gpu_memory_gib", lambda device=None: 14.5)
    assert evaluation.compile_choice(_gpu_pipe(), many, auto) == "off", "a T4 keeps the eager path"


def test_a_bad_eval_compile_setting_says_what_to_write():
    with pytest.raises(ValueError, match="CD_KIT_EVAL_COMPILE='yes'.*off, vae, all"):
        KitConfig.from_environ({"CD_KIT_EVAL_COMPILE": "yes"})
    assert KitConfig.from_environ({"CD_KIT_EVAL_COMPILE": "vae"}).eval_compile == "vae"


def test_compiled_generate_samples_equal_batches_and_drops_the_padding(monkeypatch, make_config):
    monkeypatch.setattr(evaluation, "compile_choice", lambda pipe, images, config=None: "vae")
    shapes = []

    def sampler(prompts, latents):  # one image per row, from that row alone
        shapes.append((len(prompts), latents.shape[0]))
        return latents[:, :3].float().sigmoid()

    latents = torch.randn(7, 4, 8, 8)
    eval_set = evaluation.EvalSet([f"p{i}" for i in range(7)], None, latents, 0, "captions", None)
    timing = {}
    images, _ = evaluation.generate(sampler, eval_set, batch_size=3, config=make_config(), progress=False,
                                    timing=timing)
    assert shapes == [(3, 3)] * 3, "every call has the compiled shape; the last is padded"
    assert torch.equal(images, latents[:, :3].sigmoid()), "the padded images are dropped, the order kept"
    assert timing["batch_size"] == 3 and timing["compiled"] == "vae" and len(timing["batch_seconds"]) == 3
    assert timing["first_batch_s"] == timing["batch_seconds"][0] and timing["steady_images_per_s"] > 0
    shapes.clear()
    monkeypatch.setattr(evaluation, "compile_choice", lambda pipe, images, config=None: "off")
    evaluation.generate(sampler, eval_set, batch_size=3, progress=False)
    assert shapes == [(3, 3), (3, 3), (1, 1)], "eager sampling pads nothing"


def test_compiled_sampling_computes_what_eager_sampling_does_and_is_undone():
    """The student merged into the base (the evaluation's session) and compiled, then the teacher with the adapters
    off, against the same calls eagerly; afterwards the modules run eagerly again. ``aot_eager``: dynamo's graphs and
    autograd's tracing without inductor's code generation (the GPU run measures inductor)."""
    pipe = tiny_pipeline()
    training.start_phase(pipe.unet, "cd", SMALL)
    with torch.no_grad():
        for p in training.trainable_parameters(pipe.unet):
            p.add_(0.05)  # a trained adapter
    sample = reference("consistency_sampling")
    latents = torch.randn(2, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                          generator=torch.Generator().manual_seed(0))

    def student():
        return sample(pipe, ["a 3", "a 7"], num_images_per_prompt=1, latents=latents,
                      generator=torch.Generator().manual_seed(1), output_type="pt")

    def teacher():
        with training.adapters_disabled(pipe.unet):
            return student()

    with torch.inference_mode():
        eager_student, eager_teacher = student(), teacher()
    modules = evaluation.compiled_modules(pipe, "all")
    assert modules == [pipe.vae.decoder, pipe.unet] and evaluation.compiled_modules(pipe, "vae") == [pipe.vae.decoder]
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    with torch.inference_mode(), training.fused_adapters(pipe.unet), \
            evaluation.compiled_for_sampling(pipe, "all", backend="aot_eager"):
        assert all(m._compiled_call_impl is not None for m in modules)
        compiled_student = student()
    with torch.inference_mode(), evaluation.compiled_for_sampling(pipe, "all", backend="aot_eager"):
        compiled_teacher = teacher()
    assert torch.allclose(compiled_student, eager_student, atol=1e-4)
    assert torch.allclose(compiled_teacher, eager_teacher, atol=1e-4)
    assert not torch.allclose(compiled_student, compiled_teacher, atol=1e-3), "the adapter took part"
    assert all(m._compiled_call_impl is None for m in modules), "eager again after the context"
    assert torch._dynamo.config.recompile_limit == limit
    with pytest.raises(ValueError, match="'off', 'vae' or 'all'"):
        evaluation.compiled_modules(pipe, "everything")
