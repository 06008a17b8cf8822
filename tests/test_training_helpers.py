"""The training plumbing of assignments 04-05: settings per run mode, LoRA phases, adapter files, the
encoded training set, the evaluation of samplers, and the recording fakes the checks rely on."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import data, evaluation, training
from helpers.fakes import (Recorder, ToyUNet, active_autocast, record_calls, tiny_pipeline, track_autocast,
                           track_grad_scaler)
from helpers.models import ModelSpec

SMALL = replace(training.settings_for("small"), lora_rank=4)


def _probe(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    return x, torch.tensor([999, 259]), torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)


def _out(unet, probe):
    with torch.no_grad():
        return unet(*probe[:2], encoder_hidden_states=probe[2]).sample


# ------------------------------------------------------------------------------------------ settings
def test_run_settings_shrink_under_grading_and_in_the_reduced_run(make_config):
    full = training.run_settings("small", make_config())
    assert full == training.settings_for("small")
    reduced = training.run_settings("small", make_config(reduced=True))
    assert reduced.max_steps < full.max_steps and reduced.batch_size == full.batch_size
    assert all(reduced.phase_steps[k] < full.phase_steps[k] for k in full.phase_steps)
    grading = make_config(reduced=True, execution="autograde")
    graded = training.run_settings("sd15", grading)
    assert graded.max_steps <= 2 and graded.batch_size <= 8 and graded.gradient_accumulation_steps == 1
    assert graded.num_images <= 32
    assert all(v <= 2 for v in training.run_settings("small", grading).phase_steps.values())


def test_num_phase_steps():
    assert training.num_phase_steps(replace(SMALL, max_steps=7), 10) == 7
    per_phase = replace(SMALL, max_steps=7, phase_steps={"multi_cd": 11})
    assert training.num_phase_steps(per_phase, 10, "multi_cd") == 11
    assert training.num_phase_steps(per_phase, 10, "ct") == 7
    one_pass = replace(SMALL, max_steps=None, batch_size=8, gradient_accumulation_steps=2, epochs=1)
    assert training.num_phase_steps(one_pass, 5000) == 312  # the original course's ~312 steps
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        training.num_phase_steps(one_pass, 10)


def test_small_settings_are_the_tuned_recipe():
    s = training.settings_for("small")
    assert s.max_steps and s.batch_size * s.gradient_accumulation_steps >= 16 and s.learning_rate > 1e-4
    assert set(s.lora_targets) == set(training.SD15_LORA_TARGETS)
    with pytest.raises(ValueError, match="unknown model kind"):
        training.settings_for("sdxl")


def test_profiles(make_config):
    course = training.settings_for("sd15", "course")
    assert (course.student_base, course.teacher, course.gradient_checkpointing) == ("fp32", "separate", True)
    low = training.settings_for("sd15", "low-memory")
    assert (low.student_base, low.teacher, low.gradient_checkpointing) == ("half", "shared", True)
    assert (low.batch_size, low.learning_rate, low.lora_rank) == (course.batch_size, course.learning_rate, 64)
    assert training.run_settings("small", make_config(train_profile="low-memory")).teacher == "shared"
    fast = training.settings_for("sd15", "fast")
    assert (fast.student_base, fast.teacher, fast.gradient_checkpointing) == ("half", "shared", False)
    assert (fast.batch_size, fast.gradient_accumulation_steps) == (16, 1), "the recipe's 16 examples as one batch"
    assert (fast.learning_rate, fast.lora_rank, fast.num_images) == (course.learning_rate, 64, course.num_images)
    with pytest.raises(ValueError, match="CD_KIT_TRAIN_PROFILE"):
        training.run_settings("small", make_config(train_profile="turbo"))
    if not torch.cuda.is_available():
        assert training.pick_profile() == "course"


@pytest.mark.parametrize("total_gib, fraction, profile, eval_batch", [
    (141.0, 1.0, "fast", 64),          # an H200
    (141.0, 14.5 / 141.0, "low-memory", 8),  # the same card capped to a T4's usable memory
    (15.0, 1.0, "low-memory", 8),      # a T4
    (24.0, 1.0, "course", 8),          # between the two (an L4, a 3090)
    (48.0, 1.0, "fast", 32),           # an L40S, an A6000
])
def test_profile_and_batches_follow_the_usable_gpu_memory(monkeypatch, total_gib, fraction, profile, eval_batch):
    """A cap set with torch.cuda.set_per_process_memory_fraction (a shared card, a T4 rehearsed on a big GPU) is
    what the kit sizes for, not the card's total memory."""
    from types import SimpleNamespace

    from helpers import device as kit_device
    from helpers import evaluation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: fraction, raising=False)
    assert kit_device.gpu_memory_gib() == pytest.approx(total_gib * fraction)
    assert kit_device.gpu_memory_gib("cpu") is None
    assert training.pick_profile() == profile
    big_latents = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64),
                                                       device=torch.device("cuda", 0)))
    assert evaluation.default_batch_size(big_latents) == eval_batch


def test_shared_teacher_is_the_base_without_adapters():
    pipe = tiny_pipeline()
    unet = pipe.unet
    low = replace(SMALL, student_base="half", teacher="shared")
    teacher = training.make_teacher(unet, low)
    probe = _probe(pipe)
    base = _out(unet, probe)
    training.start_phase(unet, "cd", low)
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.add_(0.1)  # a trained adapter
    assert not torch.allclose(_out(unet, probe), base)
    assert torch.equal(teacher(*probe[:2], encoder_hidden_states=probe[2]).sample, base)
    assert not torch.allclose(_out(unet, probe), base), "the adapter must be on again after the teacher's call"
    assert teacher.dtype == unet.dtype and teacher.config is unet.config
    assert not list(teacher.parameters()), "the shared teacher holds no weights of its own"
    assert isinstance(training.make_teacher(tiny_pipeline().unet, SMALL), type(unet))  # separate: a copy


def test_half_base_keeps_its_dtype_and_trains_fp32_lora():
    unet = tiny_pipeline().unet.to(torch.bfloat16)  # a half-precision base the CPU can run
    low = replace(SMALL, student_base="half", teacher="shared")
    training.start_phase(unet, "ct", low)
    params = training.trainable_parameters(unet)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert any(p.dtype == torch.bfloat16 for p in unet.parameters() if not p.requires_grad)
    training.start_phase(unet, "cd", replace(SMALL))  # the course profile: base back in fp32
    assert all(p.dtype == torch.float32 for p in unet.parameters())



def test_the_small_model_distils_at_guidance_7_5_with_a_cosine_multi_cd_and_sd15_keeps_its_recipe():
    small, sd15 = training.settings_for("small"), training.settings_for("sd15")
    assert small.guidance_scale == 7.5 and small.phase_steps == {"multi_cd": 600}
    assert small.phase_lr_schedule == {"multi_cd": "cosine"} and small.lr_schedule == "constant", "ct/cd: constant"
    assert sd15.lr_schedule == "constant" and sd15.learning_rate == 1e-4  # the original recipe, unchanged
    from helpers.models import resolve_model
    assert resolve_model("small").guidance_scale == 7.5, "the teacher's references use the CD target's guidance"


def _reference_train_loop():
    from helpers.course import SOLUTIONS_DIR
    from helpers.notebook_functions import course_namespace

    return course_namespace(SOLUTIONS_DIR, "04_consistency_loss")["train_loop"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cosine_schedule_decays_to_zero_under_the_students_unchanged_train_loop(accumulation):
    train_loop = _reference_train_loop()  # the student's function of notebook 04, as the notebooks call it
    model = torch.nn.Linear(3, 1)
    steps, settings = 10, replace(SMALL, learning_rate=0.1, lr_schedule="cosine")
    optimizer = training.make_optimizer(model.parameters(), settings)
    scheduler = training.lr_schedule(optimizer, settings, steps)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    losses = train_loop(model, optimizer, batches, lambda x, y: F.mse_loss(model(x), y), num_steps=steps,
                        gradient_accumulation_steps=accumulation, device="cpu")
    assert len(losses) == steps and len(seen) == steps, "one optimizer step, one schedule step"
    assert seen[0] == pytest.approx(0.1), "the first step uses the full learning rate"
    assert all(a > b for a, b in zip(seen, seen[1:])), f"the rate decays at every step: {seen}"
    assert seen[-1] < 0.1 * 0.03, f"the last step's rate is close to 0: {seen[-1]}"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), "after the phase the rate is 0"
    assert scheduler is not None and scheduler.last_epoch == steps
    # half way through, the cosine is at half the rate
    assert seen[steps // 2] == pytest.approx(0.05)


def test_constant_schedule_and_start_phase_without_steps_keep_the_rate():
    model = torch.nn.Linear(3, 1)
    optimizer = training.make_optimizer(model.parameters(), replace(SMALL, lr_schedule="constant"))
    assert training.lr_schedule(optimizer, replace(SMALL, lr_schedule="constant"), 5) is None
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        training.lr_schedule(optimizer, replace(SMALL, lr_schedule="linear"), 5)
    with pytest.raises(ValueError, match="number of steps"):
        training.lr_schedule(optimizer, replace(SMALL, lr_schedule="cosine"), 0)
    pipe = tiny_pipeline()
    opt = training.start_phase(pipe.unet, "ct", SMALL)  # an older notebook cell: no num_steps, constant rate
    probe = _probe(pipe)
    for _ in range(3):
        pipe.unet(*probe[:2], encoder_hidden_states=probe[2]).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == SMALL.learning_rate
    held = training.start_phase(pipe.unet, "cd", SMALL, num_steps=4)  # the small model's cd: constant
    pipe.unet(*probe[:2], encoder_hidden_states=probe[2]).sample.square().mean().backward()
    held.step()
    assert held.param_groups[0]["lr"] == SMALL.learning_rate
    cosine = training.start_phase(pipe.unet, "multi_cd", SMALL, num_steps=4)
    pipe.unet(*probe[:2], encoder_hidden_states=probe[2]).sample.square().mean().backward()
    cosine.step()
    assert cosine.param_groups[0]["lr"] == pytest.approx(SMALL.learning_rate * 0.5 * (1 + math.cos(math.pi / 4)))

# ------------------------------------------------------------------------------------------ phases
def test_phases_train_only_their_own_adapter_and_keep_the_earlier_ones():
    pipe = tiny_pipeline()
    unet = pipe.unet.to(torch.float16)  # as loaded on a GPU
    teacher = training.frozen_copy(unet)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    probe = _probe(pipe)
    optimizer = training.start_phase(unet, "ct", SMALL)
    assert unet.dtype == torch.float32 and unet.training
    trainable = training.trainable_parameters(unet)
    assert trainable and {id(p) for p in trainable} == {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(".ct." in n for n, p in unet.named_parameters() if p.requires_grad)
    fresh = _out(unet, probe)
    with training.adapters_disabled(unet):
        base = _out(unet, probe)
    assert torch.equal(fresh, base), "a new adapter starts as the identity (LoRA B = 0)"
    _out(unet, probe)
    loss = unet(*probe[:2], encoder_hidden_states=probe[2]).sample.square().mean()
    loss.backward()
    optimizer.step()
    ct_out = _out(unet, probe)
    assert not torch.equal(ct_out, base)
    with training.adapters_disabled(unet):
        assert torch.allclose(_out(unet, probe), _out(teacher.float(), probe), atol=2e-3)

    training.start_phase(unet, "cd", replace(SMALL, gradient_checkpointing=True))
    assert training.adapter_names(unet) == ["ct", "cd"] and unet.active_adapters() == ["cd"]
    assert unet.is_gradient_checkpointing
    assert all(".cd." in n for n, p in unet.named_parameters() if p.requires_grad)
    training.use_adapter(unet, "ct")
    assert torch.equal(_out(unet, probe), ct_out), "the trained ct adapter must survive the next phase"


def test_a_trained_adapter_is_not_replaced_by_accident():
    unet = tiny_pipeline().unet
    training.start_phase(unet, "ct", SMALL)
    with pytest.raises(ValueError, match="already has an adapter 'ct'"):
        training.start_phase(unet, "ct", SMALL)
    training.start_phase(unet, "ct", SMALL, replace=True)
    assert training.adapter_names(unet) == ["ct"]
    with pytest.raises(ValueError, match="take the teacher copy"):
        training.frozen_copy(unet)
    with pytest.raises(ValueError, match="No adapter 'nope'"):
        training.use_adapter(unet, "nope")


def _trained(unet, name="multi_cd", targets=training.SD15_LORA_TARGETS, rank=4, alpha=8, scale=0.01):
    """A trained-looking adapter (rank != alpha unless asked) with random non-zero LoRA weights."""
    from peft import LoraConfig

    training.prepare_unet_for_phase(unet, SMALL)
    training._add_adapter(unet, name, LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                 target_modules=list(targets)), replace=False)
    training._adapter_in_fp32(unet, name)
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.add_(scale * torch.randn_like(p))
    return unet.eval()


def test_save_and_load_round_trip_exactly_through_load_lora_weights(tmp_path):
    """All 14 target kinds, rank 4 and alpha 8: the call every LoRA user types gives back the student."""
    pipe = tiny_pipeline()
    unet, probe = _trained(pipe.unet), _probe(pipe)
    want = _out(unet, probe)
    folder = training.save_adapter(unet, "multi_cd", tmp_path / "a" / "multi_cd", sampler="multi_boundary_sampling",
                                   steps=4)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", training.ADAPTER_WEIGHTS]
    assert [p.name for p in folder.parent.iterdir()] == ["multi_cd"], "no temporary folder is left behind"
    saved = load_file(str(folder / training.ADAPTER_WEIGHTS))
    kinds = {k.split(".lora_")[0].split(".")[-1] for k in saved}
    assert {"to_q", "conv1", "time_emb_proj", "proj_in", "conv_shortcut"} <= kinds, kinds
    assert all(k.startswith("unet.") and "multi_cd" not in k for k in saved), "diffusers' keys, no adapter name"

    fresh = tiny_pipeline()
    assert not torch.equal(_out(fresh.unet, probe), want)
    fresh.load_lora_weights(str(folder))
    assert torch.equal(_out(fresh.unet, probe), want), "pipe.load_lora_weights(folder) must give the same student"
    config = next(iter(fresh.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8) and set(config.target_modules) == set(training.SD15_LORA_TARGETS)

    again = tiny_pipeline()
    again.load_lora_weights(str(tmp_path / "a"), subfolder="multi_cd", weight_name=training.ADAPTER_WEIGHTS)
    assert torch.equal(_out(again.unet, probe), want)

    unet2 = tiny_pipeline().unet
    assert training.load_adapter(unet2, folder) == "multi_cd", "the name comes from the model card"
    assert torch.equal(_out(unet2, probe), want)
    with pytest.raises(ValueError, match="already has an adapter"):
        training.load_adapter(unet2, folder)
    assert training.load_adapter(unet2, folder, name="copy") == "copy"
    assert torch.equal(_out(unet2, probe), want)


def test_saving_never_loses_an_adapter(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    unet, probe = _trained(pipe.unet), _probe(pipe)
    folder = training.save_adapter(unet, "multi_cd", tmp_path / "multi_cd")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        training.save_adapter(unet, "multi_cd", folder)
    first = (folder / training.ADAPTER_WEIGHTS).read_bytes()

    from diffusers import StableDiffusionPipeline

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        training.save_adapter(unet, "multi_cd", folder, overwrite=True)
    monkeypatch.undo()
    assert (folder / training.ADAPTER_WEIGHTS).read_bytes() == first, "a failed save keeps the earlier adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["multi_cd"], "and leaves no temporary folder"
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.mul_(2)
    training.save_adapter(unet, "multi_cd", folder, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["multi_cd"]
    fresh = tiny_pipeline().unet
    training.load_adapter(fresh, folder)
    assert torch.equal(_out(fresh, probe), _out(unet, probe)), "overwrite=True writes the new adapter"


def _old_format_file(unet, name, path):
    """An adapter file as the kit's earlier save_adapter wrote it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in unet.peft_config[name].to_dict().items()}
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}, str(path),
              metadata={"format": training.ADAPTER_FORMAT, "adapter_name": name,
                        "lora_config": json.dumps(config, default=str)})
    return path


def test_an_adapter_file_of_the_earlier_format_loads_and_converts(tmp_path):
    pipe = tiny_pipeline()
    unet, probe = _trained(pipe.unet), _probe(pipe)
    want = _out(unet, probe)
    old = _old_format_file(unet, "multi_cd", tmp_path / "multi_cd.safetensors")
    fresh = tiny_pipeline().unet
    with pytest.warns(UserWarning, match=r"training\.convert_adapter"):
        assert training.load_adapter(fresh, old) == "multi_cd"
    assert torch.equal(_out(fresh, probe), want)
    with pytest.warns(UserWarning):
        rebuilt = training.load_trained_unet(_small_model_dir(), old, "cpu", torch.float32)
    assert training.adapter_names(rebuilt) == ["multi_cd"]

    folder = training.convert_adapter(old, tmp_path / "converted")
    users = tiny_pipeline()
    users.load_lora_weights(str(folder))
    assert torch.equal(_out(users.unet, probe), want), "the converted folder loads with pipe.load_lora_weights"
    with pytest.raises(ValueError, match="earlier format"):
        training.convert_adapter(folder / training.ADAPTER_WEIGHTS, tmp_path / "again")


def _small_model_dir():
    from helpers.small_model import SMALL_MODEL_DIR

    return SMALL_MODEL_DIR


def test_an_adapter_saved_like_the_lcm_lora_script_loads_into_the_kit_samplers(tmp_path):
    """diffusers' train_lcm_distill_lora_sd_wds.py: convert_state_dict_to_diffusers(get_peft_model_state_dict)
    then save_lora_weights, no metadata (so alpha = rank), here with attention-only targets."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipe = tiny_pipeline()
    unet = _trained(pipe.unet, "default", targets=("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=4, scale=0.05)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lcm", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    assert any(".lora.down." in k for k in load_file(str(tmp_path / "lcm" / training.ADAPTER_WEIGHTS))), (
        "the LCM script's file has diffusers' old key names")
    eval_set = evaluation.make_eval_set(pipe, per_digit=1)
    want = evaluation.pipeline_sampler(pipe, 2, guidance_scale=1.0)(eval_set.prompts[:2], eval_set.latents[:2])

    student = tiny_pipeline()
    name = training.load_adapter(student.unet, tmp_path / "lcm")
    assert name in training.adapter_names(student.unet) and student.unet.active_adapters() == [name]
    got = evaluation.pipeline_sampler(student, 2, guidance_scale=1.0)(eval_set.prompts[:2], eval_set.latents[:2])
    assert torch.equal(got, want), "the LCM-LoRA adapter must drive the kit's sampler as the trained UNet does"
    teacher = evaluation.pipeline_sampler(tiny_pipeline(), 2, guidance_scale=1.0)(eval_set.prompts[:2],
                                                                                  eval_set.latents[:2])
    assert not torch.equal(got, teacher)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_a_file_that_loses_weights_on_reload_is_refused(tmp_path):
    """diffusers issue 14548: convert_state_dict_to_diffusers with the 14 target kinds drops the attention LoRA."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    unet = _trained(tiny_pipeline().unet, "default", rank=4, alpha=4)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "bad", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    fresh = tiny_pipeline().unet
    with pytest.raises(ValueError, match="14548"):
        training.load_adapter(fresh, tmp_path / "bad")
    assert training.adapter_names(fresh) == [], "a refused adapter is removed again"


def test_adapter_files_are_checked(tmp_path):
    unet = tiny_pipeline().unet
    with pytest.raises(ValueError, match="writes a folder"):
        _trained(unet, "ct")
        training.save_adapter(unet, "ct", tmp_path / "ct.safetensors")
    with pytest.raises(ValueError, match="No adapter 'nope'"):
        training.save_adapter(unet, "nope", tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        training.load_adapter(unet, tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        training.save_adapter(unet, "ct", tmp_path / "file", overwrite=True)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        training.load_adapter(tiny_pipeline().unet, tmp_path / "other.safetensors")


def test_the_model_card_says_how_to_use_the_adapter(tmp_path):
    from huggingface_hub import ModelCard

    card = training.model_card("stable-diffusion-v1-5/stable-diffusion-v1-5", "multi_cd",
                               {"r": 64, "lora_alpha": 64, "target_modules": list(training.SD15_LORA_TARGETS)},
                               sampler="multi_boundary_sampling (K = 4)", steps=4,
                               metrics={"multi_cd_4_matched": {"prompt_accuracy": 0.91, "fidelity_psnr_db": 21.5}},
                               repo_id="someone/sd15-multi-cd")
    data = card.data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"lora", "consistency-distillation"} <= set(data["tags"]) and data["library_name"] == "diffusers"
    assert data["inference_steps"] == 4 and "multi_boundary_sampling" in data["sampler"]
    text = card.text
    assert 'pipe.load_lora_weights("someone/sd15-multi-cd")' in text and "multi_boundary_sampling" in text
    assert "0.91" in text and "21.5" in text and "rank 64, alpha 64" in text and "time_emb_proj" in text

    unet = _trained(tiny_pipeline().unet)
    folder = training.save_adapter(unet, "multi_cd", tmp_path / "a", base_model=_small_model_dir(), steps=4,
                                   metrics={"prompt_accuracy": 0.5})
    saved = ModelCard.load(folder / "README.md")
    assert "base_model" not in saved.data.to_dict(), "a local folder is no Hub id"
    assert saved.data.to_dict()["adapter_name"] == "multi_cd" and "digits-sd" in saved.text
    assert "rank 4, alpha 8" in saved.text and "| prompt_accuracy | 0.5 |" in saved.text


def test_make_optimizer_needs_parameters():
    with pytest.raises(ValueError, match="add a LoRA adapter first"):
        training.make_optimizer([], SMALL)


# ------------------------------------------------------------------------------------------ data
def test_digit_pairs_are_repeatable_with_varied_prompts():
    images, captions, digits = data.digit_pairs(40, seed=3)
    again = data.digit_pairs(40, seed=3)
    assert images.shape == (40, 3, 32, 32) and torch.equal(images, again[0]) and captions == again[1]
    assert images.min() >= -1 and images.max() <= 1
    assert len(set(captions)) > 10, "prompts vary across templates"
    from helpers.small_model import DIGIT_WORDS

    assert all(str(int(d)) in c or DIGIT_WORDS[int(d)] in c for c, d in zip(captions, digits)), "captions name the digit"
    assert data.digit_pairs(40, seed=4)[1] != captions


def test_training_dataset_is_encoded_once_and_cached(kit_config, monkeypatch):
    out = kit_config.out_path
    pipe = tiny_pipeline()
    spec = ModelSpec("tiny", "tiny-source", "small", 3.0, "7")
    settings = replace(SMALL, num_images=24)
    first = data.training_dataset(pipe, spec, settings, kit_config)
    latents, embeds = first.tensors
    assert latents.shape == (24, 4, 16, 16) and embeds.shape == (24, 77, pipe.text_encoder.config.hidden_size)
    cached = list((out / "cache").glob("train-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(data, "encode_pairs", lambda *a, **k: pytest.fail("encoded twice"))
    assert data.training_dataset(pipe, spec, settings, kit_config) is first
    data._MEMORY.clear()
    again = data.training_dataset(pipe, spec, settings, kit_config)
    assert torch.equal(again.tensors[0], latents)


def test_dataset_is_not_written_while_grading(make_config):
    graded = make_config(execution="autograde")
    data._MEMORY.clear()
    data.training_dataset(tiny_pipeline(), ModelSpec("t", "graded-source", "small", 3.0, "7"), replace(SMALL, num_images=8),
                          graded)
    assert not list(graded.out_path.rglob("train-*.pt"))


def test_encode_pairs_scales_latents():
    pipe = tiny_pipeline()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    ds = data.encode_pairs(pipe, (images, ["1", "2", "3", "4"]), batch_size=3, progress=False)
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    assert ds.tensors[0].shape == mean.shape and (ds.tensors[0] - mean).abs().mean() < 0.5 * mean.abs().mean() + 0.5
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        data.encode_pairs(pipe, (images, ["1", "2", "3"]), progress=False)


def test_dataloader_batches_are_whole_and_fp32():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 4, 2, 2).half(), torch.randn(10, 3, 5).half())
    batches = list(data.training_dataloader(ds, batch_size=4, seed=0))
    assert len(batches) == 2 and all(b[0].shape[0] == 4 and b[0].dtype == torch.float32 for b in batches)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.training_dataloader(ds, batch_size=11)


def test_data_source_follows_the_model_kind(make_config):
    unset = make_config().data
    assert data.data_source("small", unset) == "digits" and data.data_source("custom", unset) == "digits"
    assert data.data_source("sd15", unset) == "captions"
    folder = make_config(data="/somewhere").data
    assert data.data_source("custom", folder) == "captions" and data.data_source("small", folder) == "digits"


# ------------------------------------------------------------------------------------------ evaluation
def test_eval_set_is_fixed():
    pipe = tiny_pipeline()
    a, b = evaluation.make_eval_set(pipe, per_digit=2, seed=5), evaluation.make_eval_set(pipe, per_digit=2, seed=5)
    assert len(a) == 20 and a.prompts == b.prompts and torch.equal(a.latents, b.latents)
    assert a.digits.tolist() == [d for d in range(10) for _ in range(2)]
    assert a.key() != evaluation.make_eval_set(pipe, per_digit=2, seed=6).key()
    with pytest.raises(ValueError):
        evaluation.make_eval_set(pipe, per_digit=0)


def test_samplers_start_from_the_given_latents():
    pipe = tiny_pipeline(ToyUNet(sample_size=16))
    eval_set = evaluation.make_eval_set(pipe, per_digit=1)
    with record_calls(pipe.unet) as calls:
        images = evaluation.pipeline_sampler(pipe, 2, guidance_scale=1.0)(eval_set.prompts[:3], eval_set.latents[:3])
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(calls[0].sample, eval_set.latents[:3] * pipe.scheduler.init_noise_sigma)
    seen = {}

    def sampler(pipe, prompts, num_images_per_prompt, latents, generator, output_type, **kw):
        seen.update(latents=latents, n=num_images_per_prompt, output_type=output_type, kw=kw)
        return torch.zeros(len(prompts), 3, 32, 32)

    evaluation.function_sampler(sampler, pipe, num_boundaries=4)(eval_set.prompts[:2], eval_set.latents[:2])
    assert torch.equal(seen["latents"], eval_set.latents[:2]) and seen["n"] == 1 and seen["output_type"] == "pt"
    assert seen["kw"] == {"num_boundaries": 4}


def test_evaluate_records_and_the_teacher_reference_is_cached(kit_config, monkeypatch):
    out = kit_config.out_path
    pipe = tiny_pipeline(ToyUNet(sample_size=16))
    eval_set = evaluation.make_eval_set(pipe, per_digit=1)
    ref = evaluation.teacher_reference(pipe, eval_set, 2.0, "tiny", kit_config, num_inference_steps=2)
    assert ref.name == "teacher_ddim50" and ref.fidelity_psnr_db == 100.0 and 0 <= ref.prompt_accuracy <= 1
    four = evaluation.evaluate("teacher_ddim4", evaluation.pipeline_sampler(pipe, 1, 2.0), eval_set, ref.images,
                               kit_config, steps=1)
    assert four.fidelity_psnr_db < 100.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["samplers"]) == {"teacher_ddim50", "teacher_ddim4"}
    assert metrics["samplers"]["teacher_ddim4"]["steps"] == 1 and "sample_teacher_ddim4" in metrics["timings_s"]
    monkeypatch.setattr(evaluation, "pipeline_sampler", lambda *a, **k: pytest.fail("the teacher ran again"))
    cached = evaluation.teacher_reference(pipe, eval_set, 2.0, "tiny", kit_config, num_inference_steps=2)
    assert torch.equal(cached.images, ref.images) and cached.extra["cached"] is True
    assert cached.metrics == ref.metrics  # measured again from the cached images: the same numbers
    text = evaluation.results_table([ref, four])
    assert "teacher_ddim4" in text and "100.00" in text


# ------------------------------------------------------------------------------------------ fakes
def test_track_autocast_records_requests_and_restores_torch():
    cls = torch.amp.autocast_mode.autocast
    before = (cls.__init__, cls.__enter__, cls.__exit__)
    with track_autocast():
        assert active_autocast() == ()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            inner = active_autocast()
        assert active_autocast() == ()
    assert inner and inner[-1].device_type == "cpu" and inner[-1].dtype == torch.bfloat16 and not inner[-1].enabled
    assert (cls.__init__, cls.__enter__, cls.__exit__) == before


def test_track_grad_scaler_counts_use():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with track_grad_scaler() as log:
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert log.created == [{"device": "cuda", "enabled": False}] and (log.scale, log.step, log.update) == (1, 1, 1)
    torch.amp.GradScaler("cuda", enabled=False).scale(p.sum())
    assert log.scale == 1, "counting stops with the context"


def test_toy_unet_and_recorder():
    toy = ToyUNet(sample_size=8)
    x, e = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    a = toy(x, torch.tensor([1, 500, 999]), encoder_hidden_states=e).sample
    b = toy(x, 500, e, return_dict=False)[0]
    assert a.shape == x.shape and not torch.equal(a, b) and torch.equal(a[1], b[1])
    assert [c.timesteps.tolist() for c in toy.calls] == [[1, 500, 999], [500, 500, 500]]
    rec = Recorder(lambda p, q=2: p + q)
    assert rec(1) == 3 and rec.calls[0]["p"] == 1 and rec.calls[0]["q"] == 2 and rec.calls[0]["return"] == 3
    with record_calls(toy) as calls:
        toy(x, 3, e)
    toy(x, 3, e)
    assert len(calls) == 1


def test_adapter_on_a_half_base_reloads_exactly(tmp_path):
    unet = tiny_pipeline().unet.to(torch.bfloat16)
    low = replace(SMALL, student_base="half", teacher="shared")
    training.start_phase(unet, "multi_cd", low)
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.add_(torch.randn_like(p) * 1e-3)  # values that a half-precision copy would round
    path = training.save_adapter(unet, "multi_cd", tmp_path / "a")
    fresh = tiny_pipeline().unet.to(torch.bfloat16)
    training.load_adapter(fresh, path)
    ours = dict(unet.named_parameters())
    for n, p in fresh.named_parameters():
        if ".multi_cd." in n:
            assert p.dtype == torch.float32 and torch.equal(p, ours[n]), n


def test_student_trained_on_a_half_loaded_base_rebuilds_exactly(tmp_path):
    """The GPU course profile: the pipeline loads the base in fp16, the student trains in fp32 on that base.
    load_trained_unet rebuilds it the same way; a base loaded straight in fp32 does not match it."""
    from diffusers import UNet2DConditionModel

    from helpers.small_model import SMALL_MODEL_DIR

    unet = UNet2DConditionModel.from_pretrained(SMALL_MODEL_DIR, subfolder="unet", dtype=torch.float16)
    training.start_phase(unet, "multi_cd", SMALL)
    assert unet.dtype == torch.float32
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.add_(torch.randn_like(p) * 1e-2)
    path = training.save_adapter(unet, "multi_cd", tmp_path / "multi_cd")
    unet.eval()
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 259]), torch.randn(2, 77, 64, generator=g))

    rebuilt = training.load_trained_unet(SMALL_MODEL_DIR, path, "cpu", torch.float32, load_dtype=torch.float16)
    assert rebuilt.dtype == torch.float32 and not rebuilt.training
    assert torch.equal(_out(rebuilt, probe), _out(unet, probe))

    naive = UNet2DConditionModel.from_pretrained(SMALL_MODEL_DIR, subfolder="unet", dtype=torch.float32)
    training.load_adapter(naive, path)
    naive.eval()
    assert (_out(naive, probe) - _out(unet, probe)).abs().max() > 1e-6, "fp32 base differs from the fp16-loaded one"


def test_sampling_shows_one_bar_in_images(kit_config, make_config, capsys):
    """One tqdm bar over the images (unit img); the pipeline's own per-step bar stays off and its settings
    come back afterwards; under nbgrader the bar goes to stdout."""
    pipe = tiny_pipeline(ToyUNet(sample_size=16))
    pipe.set_progress_bar_config(disable=False, leave=True)
    eval_set = evaluation.make_eval_set(pipe, per_digit=1)
    evaluation.evaluate("teacher_ddim2", evaluation.pipeline_sampler(pipe, 2, 2.0), eval_set, None, kit_config,
                        batch_size=4, record=False)
    err = capsys.readouterr().err
    assert "teacher_ddim2" in err and "10/10" in err and "img/s" in err, err
    assert "2/2" not in err and "it/s" not in err, f"the pipeline's own bar showed too: {err!r}"
    assert pipe._progress_bar_config == {"disable": False, "leave": True}, "the pipeline's bar settings are restored"

    def sampler(pipe_, prompts, num_images_per_prompt, latents, generator, output_type):
        for _ in pipe_.progress_bar(range(3)):
            pass
        return torch.zeros(len(prompts), 3, 32, 32)

    graded = make_config(execution="autograde")
    evaluation.evaluate("student", evaluation.function_sampler(sampler, pipe), eval_set, None, graded, batch_size=5,
                        record=False)
    out = capsys.readouterr()
    assert "student" in out.out and "10/10" in out.out and "img" in out.out and "3/3" not in out.out + out.err
    assert out.err == "", "under nbgrader the bar writes to stdout"


def test_optimizer_is_fused_only_on_cuda():
    cpu = training.make_optimizer([torch.nn.Parameter(torch.zeros(3))], SMALL)
    assert not cpu.defaults["fused"], "the fused AdamW kernel is for CUDA tensors"
    if torch.cuda.is_available():
        gpu = training.make_optimizer([torch.nn.Parameter(torch.zeros(3, device="cuda"))], SMALL)
        assert gpu.defaults["fused"]


def test_vae_decode_outside_autocast_runs_the_vae_in_its_own_dtype():
    pipe = tiny_pipeline()
    z = torch.randn(1, 4, 8, 8)
    original = pipe.vae.decode
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = pipe.vae.decode(z).sample
        with evaluation.vae_decode_outside_autocast(pipe):
            plain = pipe.vae.decode(z.double()).sample  # any float input is cast to the VAE's dtype
    assert under.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.allclose(plain, pipe.vae.decode(z).sample, atol=1e-6), "outside autocast: the plain fp32 decode"
    assert "decode" not in pipe.vae.__dict__ and pipe.vae.decode == original, "the VAE's decode is restored"


def test_default_evaluation_batch():
    assert evaluation.default_batch_size(tiny_pipeline()) == 100  # small latents: the whole set at once


def test_fused_adapters_sample_as_the_unfused_student_and_restore_the_base_exactly():
    """Merged for sampling, the student computes what the unfused one does; afterwards the base (the shared
    teacher) is bit for bit what it was, and inside adapters_disabled nothing is merged."""
    pipe = tiny_pipeline()
    unet = pipe.unet
    training.start_phase(unet, "cd", SMALL)
    with torch.no_grad():
        for p in training.trainable_parameters(unet):
            p.add_(0.05)  # a trained adapter
    probe = _probe(pipe)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    student = _out(unet, probe)
    with training.adapters_disabled(unet):
        base = _out(unet, probe)
    with training.fused_adapters(unet):
        assert torch.allclose(_out(unet, probe), student, atol=1e-5)
        assert not torch.allclose(_out(unet, probe), base)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert torch.equal(_out(unet, probe), student)
    with training.adapters_disabled(unet), training.fused_adapters(unet):
        assert torch.equal(_out(unet, probe), base), "the teacher's calls must not get the adapter merged in"


def test_eval_size_is_500_digits_by_default_and_eval_images_overrides(make_config):
    assert evaluation.eval_size("digits", make_config()) == 500, "50 per digit: the 4-step FD gap is 12 x its spread"
    assert evaluation.eval_size("captions", make_config()) == 100
    assert evaluation.eval_size("digits", make_config(eval_images=200)) == 200
    assert evaluation.eval_size("digits", make_config(reduced=True)) == 50, "CI's reduced run stays small"
    assert evaluation.eval_size("digits", make_config(reduced=True, execution="autograde")) == 10
