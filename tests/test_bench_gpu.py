"""scripts/bench_gpu.py: the tiny CPU run writes a complete, self-consistent JSON; the pieces it is built
from (SD1.5 configs, students and teachers from the kit's start_phase / make_teacher) do what they claim."""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import training

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"

# Every code path of the script, kept small enough for < 60 s on a loaded 2-core CPU: the peft baseline,
# separate and shared teachers, gradient checkpointing, a sampler with an unfused adapter, and one
# variant of each CUDA-only kind (bf16, compile) that must be skipped with a reason.
TRAIN = ["lcm-lora-baseline", "kit-original", "kit-original-ckpt", "kit-fp16-shared", "kit-bf16-shared",
         "kit-fp16-shared-compile"]
SAMPLE = ["sample-fp16-lora", "sample-fp16-compile"]
BATCHES = [1, 2]
CUDA_ONLY = {"kit-bf16-shared", "kit-fp16-shared-compile", "sample-fp16-compile"}


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_script()


def _solutions_present() -> bool:
    from autograder.reference import SOLUTIONS_DIR

    return all((SOLUTIONS_DIR / a / nb).exists() for a, nb in
               (("02_ddim_step", "ddim_step.ipynb"), ("04_consistency_loss", "consistency_loss.ipynb")))


needs_solutions = pytest.mark.skipif(
    not _solutions_present(),
    reason="the benchmark builds its step from solutions/02 and solutions/04, which are not written yet")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, float]:
    """The script's JSON and the CPU seconds it took (CPU time, not wall time: the test machines are shared
    and wall time there mostly measures the other jobs)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out), "--iters", "1",
           "--warmup", "1", "--sample-batch", "2", "--threads", "1", "--batch-sizes", *map(str, BATCHES),
           "--variants", *TRAIN, *SAMPLE]
    env = {**os.environ, "MPLBACKEND": "Agg", "CD_KIT_DEVICE": "cpu"}
    cpu0 = _children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    cpu_s = _children_cpu_s() - cpu0
    assert proc.returncode == 0, f"bench_gpu.py --tiny failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "training step" in proc.stdout and "targets:" in proc.stdout, "the summary table was not printed"
    return json.loads(out.read_text()), cpu_s


def _train(data: dict, variant: str, batch: int) -> dict:
    recs = [r for r in data["train"] if r["variant"] == variant and r["batch_size"] == batch]
    assert len(recs) == 1, f"expected one record of {variant} at batch {batch}, got {len(recs)}"
    return recs[0]


@needs_solutions
def test_tiny_cpu_run_is_fast(tiny_run):
    assert tiny_run[1] < 60, f"the tiny CPU run took {tiny_run[1]:.0f} CPU seconds (budget 60 s)"


@needs_solutions
def test_json_records_environment_and_settings(tiny_run):
    data, _ = tiny_run
    assert data["schema"] == bench.SCHEMA
    assert data["device"]["type"] == "cpu"
    for lib in ("python", "torch", "diffusers", "transformers", "peft"):
        assert data["versions"][lib], f"version of {lib} missing"
    assert datetime.datetime.fromisoformat(data["date"]).tzinfo is not None
    assert "--tiny" in data["command"]
    s = data["settings"]
    assert s["tiny"] is True and s["batch_sizes"] == BATCHES and s["iters"] == 1
    assert s["lora_rank"] == bench.TINY_LORA_RANK
    assert s["current_kit_default"] in bench.ALL_VARIANTS
    assert s["kit_defaults"] == {"course": "kit-original-ckpt", "fast": "kit-fp16-shared",
                                 "low-memory": "kit-fp16-shared-ckpt"}
    assert isinstance(data["elapsed_s"], float)


@needs_solutions
def test_every_requested_measurement_is_recorded_once(tiny_run):
    data, _ = tiny_run
    got = sorted((r["variant"], r["batch_size"]) for r in data["train"])
    want = sorted((v, b) for v in TRAIN for b in BATCHES if not bench.ALL_VARIANTS[v].compile)
    # compiled variants run at the largest batch only
    want += [(v, max(BATCHES)) for v in TRAIN if bench.ALL_VARIANTS[v].compile]
    assert got == sorted(want)
    assert sorted(r["variant"] for r in data["sampling"]) == sorted(SAMPLE)


@needs_solutions
def test_cuda_only_parts_are_skipped_with_a_reason(tiny_run):
    data, _ = tiny_run
    assert data["cuda_only_skipped"] and all(data["cuda_only_skipped"].values())
    assert data["matmul"]["float16"] == {"skipped": "CUDA only"}
    assert data["matmul"]["float32"]["tflops"] > 0
    for rec in data["train"] + data["sampling"]:
        if rec["variant"] in CUDA_ONLY:
            assert rec["status"] == "skipped" and "CUDA" in rec["reason"], rec
        else:
            assert rec["peak_mem_gib"] is None, "peak memory is CUDA-only, it must be null on a CPU"
    assert all(not t["applicable"] for t in data["targets"])


@needs_solutions
def test_runnable_measurements_succeed_with_sane_numbers(tiny_run):
    data, _ = tiny_run
    for rec in data["train"]:
        if rec["variant"] in CUDA_ONLY:
            continue
        assert rec["status"] == "ok", rec
        assert rec["iters"] == 1 and rec["median_s"] > 0
        assert math.isclose(rec["steps_per_s"], 1 / rec["median_s"], rel_tol=1e-2)
        assert rec["loss_finite"] and rec["optimizer_stepped"], f"{rec['variant']}: no real optimizer step"
        assert rec["compute_dtypes"] == ["torch.float32"], "a CPU run must compute in fp32"
        assert 0 < rec["fraction_of_floor"] and rec["floor_steps_per_s"] > 0
    for rec in data["sampling"]:
        if rec["variant"] not in CUDA_ONLY:
            assert rec["status"] == "ok", rec
            assert math.isclose(rec["images_per_s"], 2 / rec["median_s"], rel_tol=1e-2)


@needs_solutions
def test_trainable_parameters_are_the_lora_of_the_kit(tiny_run):
    data, _ = tiny_run
    counts = {r["trainable_params"] for r in data["train"] if r["status"] == "ok"}
    assert len(counts) == 1, f"every variant must train the same adapter, got {counts}"


@needs_solutions
def test_teacher_is_called_conditional_and_unconditional(tiny_run):
    data, _ = tiny_run
    for rec in data["train"]:
        if rec["status"] == "ok":
            calls = rec["teacher_calls"]
            assert sum(calls) == 2 * rec["batch_size"], f"{rec['variant']}: teacher calls {calls}"


@needs_solutions
def test_flop_counts_are_consistent(tiny_run):
    data, _ = tiny_run
    for b in BATCHES:
        plain = _train(data, "kit-original", b)["flops_per_step"]
        assert plain > 0
        # where the teacher's weights live does not change the work
        assert _train(data, "kit-fp16-shared", b)["flops_per_step"] == plain
        # diffusers' step makes the same UNet calls
        assert math.isclose(_train(data, "lcm-lora-baseline", b)["flops_per_step"], plain, rel_tol=0.05)
        # checkpointing recomputes the student's forward: more work, less than one more forward-backward
        ckpt = _train(data, "kit-original-ckpt", b)["flops_per_step"]
        assert plain < ckpt < 1.5 * plain
    one, two = (_train(data, "kit-original", b)["flops_per_step"] for b in BATCHES)
    assert math.isclose(two, 2 * one, rel_tol=0.05), "FLOPs must grow linearly with the batch"


def test_sd15_configs_have_sd15_parameter_counts():
    """Published parameter counts of SD1.5's UNet, VAE and CLIP ViT-L/14 text tower."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bench.SD15_UNET)
        vae = AutoencoderKL.from_config(bench.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**bench.SD15_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


def _tiny_students(variant: str):
    """A variant's student and teacher as the benchmark builds them, with a trained-looking adapter (lora_B
    starts at zero, which would hide a teacher that still runs the adapter)."""
    torch.manual_seed(0)
    student, teacher, params, optimizer = bench.make_students(bench.ALL_VARIANTS[variant], bench.TINY_UNET,
                                                              torch.device("cpu"), bench.lora_settings(tiny=True))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return student.eval(), teacher, params, optimizer


def _tiny_inputs():
    cfg = bench.TINY_UNET
    return (torch.randn(2, 4, cfg["sample_size"], cfg["sample_size"]), torch.tensor([999, 499]),
            torch.randn(2, 77, cfg["cross_attention_dim"]))


def test_shared_teacher_is_the_base_without_lora_and_restores_the_student():
    unet, teacher, params, _ = _tiny_students("kit-fp16-shared")
    x, t, emb = _tiny_inputs()
    with torch.no_grad():
        student = unet(x, t, encoder_hidden_states=emb).sample
        unet.disable_adapters()  # diffusers' own switch, as the reference for "LoRA off"
        base = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_adapters()
        teacher.calls = []
        viewed = teacher(x, t, encoder_hidden_states=emb).sample
        after = unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(student, base), "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(viewed, base)
    torch.testing.assert_close(after, student, msg="the student's adapter must be on again after a teacher call")
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n), "LoRA must stay trainable"
    assert teacher.calls == [2]
    assert teacher.dtype == unet.dtype and teacher.config is unet.config
    assert not list(teacher.parameters()), "a shared teacher holds no weights of its own"


def test_separate_teacher_is_a_frozen_copy_of_the_base():
    unet, teacher, _, _ = _tiny_students("kit-original")
    x, t, emb = _tiny_inputs()
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_adapters()
        viewed = teacher(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(viewed, base)
    assert teacher.teacher is not unet and not any(p.requires_grad for p in teacher.parameters())
    assert not training.adapter_names(teacher.teacher), "the teacher copy is taken before the adapter"


@pytest.mark.parametrize("variant", ["kit-original", "kit-original-ckpt", "kit-fp16-shared", "lcm-lora-baseline"])
def test_students_and_teachers_come_from_the_kits_training_functions(monkeypatch, variant):
    """make_students calls helpers.training's make_teacher and start_phase (not a copy of them) with the
    variant's settings; the peft baseline only takes the kit's teacher."""
    assert bench.make_teacher is training.make_teacher and bench.start_phase is training.start_phase
    calls: list[tuple] = []

    def recording(name, fn):
        def wrapper(unet, *args, **kwargs):
            calls.append((name, unet, args, kwargs))
            return fn(unet, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(bench, "make_teacher", recording("make_teacher", training.make_teacher))
    monkeypatch.setattr(bench, "start_phase", recording("start_phase", training.start_phase))
    v = bench.ALL_VARIANTS[variant]
    student, teacher, params, optimizer = bench.make_students(v, bench.TINY_UNET, torch.device("cpu"),
                                                              bench.lora_settings(tiny=True))
    names = [c[0] for c in calls]
    assert names == (["make_teacher"] if v.step == "lcm_lora" else ["make_teacher", "start_phase"])
    settings = calls[0][2][0]
    assert (settings.teacher, settings.student_base, settings.gradient_checkpointing) == \
        (v.teacher, v.student_base, v.checkpointing)
    assert settings.lora_rank == bench.TINY_LORA_RANK
    if v.step != "lcm_lora":
        _, unet, (phase, phase_settings), _ = calls[1]
        assert unet is student and phase == bench.PHASE and phase_settings == settings
        assert training.adapter_names(student) == [bench.PHASE]
        assert {id(p) for p in params} == {id(p) for p in training.trainable_parameters(student)}
        assert optimizer is not None and student.is_gradient_checkpointing == v.checkpointing
    assert isinstance(teacher, bench.RecordingTeacher)
    assert isinstance(teacher.teacher, training.SharedBaseTeacher) == (v.teacher == "shared")


def test_sampling_adapter_is_the_kits(monkeypatch):
    calls = []

    def recording(unet, name, settings):
        calls.append(name)
        return training.add_phase_adapter(unet, name, settings)

    monkeypatch.setattr(bench, "add_phase_adapter", recording)
    pipe = bench.setup_pipeline(bench.ALL_VARIANTS["sample-fp16-lora"], bench.model_configs(tiny=True),
                                torch.device("cpu"), tiny=True)
    assert calls == [bench.PHASE] and training.adapter_names(pipe.unet) == [bench.PHASE]


def test_unknown_variant_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "kit-fp8"])
    err = capsys.readouterr().err
    assert "kit-fp8" in err and "kit-fp16-shared" in err


def test_plan_runs_eager_first_and_compiled_at_the_largest_batch_only():
    args = bench.parse_args(["--batch-sizes", "16", "8"])
    order = bench.plan(args)
    compiled = [i for i, (_, v, _) in enumerate(order) if v.compile]
    assert compiled and min(compiled) > max(i for i, (_, v, _) in enumerate(order) if not v.compile)
    assert {b for _, v, b in order if v.compile and b is not None} == {16}
    assert order[min(compiled)][1].name == "kit-fp16-shared-compile"
    assert sorted(b for k, v, b in order if v.name == "kit-original") == [8, 16]


def test_a_dtype_the_kit_overrides_is_flagged():
    bf16 = bench.ALL_VARIANTS["kit-bf16-shared"]
    cuda = torch.device("cuda")  # only names the device; nothing runs on it
    assert "float16" in bench.dtype_warning(bf16, cuda, ["torch.float16"])
    assert bench.dtype_warning(bf16, cuda, ["torch.bfloat16"]) is None
    assert bench.dtype_warning(bench.ALL_VARIANTS["kit-fp16-shared"], torch.device("cpu"), ["torch.float32"]) is None


def _rec(variant: str, batch: int, steps: float, mem: float, amp: str = "fp16", status: str = "ok") -> dict:
    return {"variant": variant, "step": "kit", "amp": amp, "batch_size": batch, "steps_per_s": steps,
            "peak_mem_gib": mem, "status": status}


def test_targets_pick_the_fastest_qualifying_variant():
    result = {"device": {"type": "cuda"}, "settings": {"tiny": False, "batch_sizes": [8, 16]},
              "train": [_rec("a", 16, 3.4, 30.0), _rec("b", 16, 2.0, 20.0), _rec("c", 16, 9.0, 10.0, status="OOM"),
                        _rec("a", 8, 4.0, 15.0), _rec("d", 8, 3.0, 11.5), _rec("e", 8, 3.5, 9.0, amp="bf16")],
              "sampling": [{"variant": "s", "images_per_s": 35.0, "status": "ok"}]}
    fast, t4, sampler = bench.targets(result)
    assert (fast["best_variant"], fast["met"], fast["applicable"]) == ("a", True, True)
    assert (t4["best_variant"], t4["value"]) == ("d", 3.0), "fastest fp16 variant within 12 GiB at batch 8"
    assert (sampler["best_variant"], sampler["met"]) == ("s", False)
