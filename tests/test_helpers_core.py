"""The helpers that every notebook calls: device, model setting, schedule, report, course table, plots."""
from __future__ import annotations

import json

import nbformat
import pytest
import torch
from diffusers import DDIMScheduler

from helpers.config import KitConfig
from helpers.course import ASSIGNMENTS, assignment, assignment_of
from helpers.device import pick_device, pick_dtype
from helpers.models import SD15_MODEL_ID, load_course_pipeline, resolve_model
from helpers.notebook_functions import answer_cells, default_course_dir, load_course_functions
from helpers.plotting import plot_losses, show_images
from helpers.schedule import alpha_sigma, gather, timesteps_like

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def test_device_and_dtype(make_config):
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("cpu") is torch.float32
    assert pick_dtype("cuda") is torch.float16
    assert pick_dtype("cpu", "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_dtype("cpu", "fp8")
    assert pick_device(make_config(device="cpu").device) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        pick_device("cuda")


def test_model_setting(make_config):
    small = resolve_model(make_config().model)
    assert small.kind == "small"
    for name in ("sd15", "SD1.5", "runwayml/stable-diffusion-v1-5", SD15_MODEL_ID):
        spec = resolve_model(name)
        assert spec.kind == "sd15" and spec.source == SD15_MODEL_ID  # the maintained mirror, never runwayml
        assert spec.guidance_scale == 7.5
    custom = resolve_model(make_config(model="some-org/some-model").model)
    assert custom.source == "some-org/some-model" and custom.kind == "custom"
    assert resolve_model().kind == "small"  # no setting: the kit's small model


def test_sd15_offline_error_says_what_to_do(monkeypatch, make_config):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="CD_KIT_MODEL=small"):
        load_course_pipeline(make_config(model="sd15"), device="cpu")


def test_gather_and_alpha_sigma():
    sched = DDIMScheduler(**SD15_SCHEDULER)
    t = torch.tensor([0, 19, 999])
    a, s = alpha_sigma(sched, t, ndim=4)
    assert a.shape == (3, 1, 1, 1) and s.shape == (3, 1, 1, 1)
    ab = sched.alphas_cumprod
    torch.testing.assert_close(a.flatten() ** 2, ab[t].float())
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a))
    assert a[0].item() < 1.0  # no boundary override here: that is the students' job
    assert gather(torch.arange(10.0), torch.tensor([3, 7]), 2).tolist() == [[3.0], [7.0]]
    with pytest.raises(ValueError, match="1-D"):
        gather(torch.arange(10.0), torch.tensor([[1]]), 4)
    assert timesteps_like(5, 3, "cpu").tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="expected 2"):
        timesteps_like([1, 2, 3], 2, "cpu")


def test_course_table_is_consistent():
    ids = [a.id for a in ASSIGNMENTS]
    assert ids == sorted(ids) and len(ids) == 5
    fns = [f for a in ASSIGNMENTS for f in a.functions]
    assert len(fns) == len(set(fns))
    assert assignment_of("q_sample").id == "02_ddim_step"
    assert assignment("05_multi_boundary").notebook == "multi_boundary.ipynb"
    with pytest.raises(KeyError, match="No assignment"):
        assignment("06_nope")


def _answer_notebook(path, cells: dict[str, str]):
    nb = nbformat.v4.new_notebook()
    for grade_id, src in cells.items():
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["nbgrader"] = {"solution": True, "grade": False, "grade_id": grade_id, "locked": False,
                                     "schema_version": 3}
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))  # not an answer cell: ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_load_course_functions_reads_the_students_earlier_notebooks(tmp_path, monkeypatch, make_config):
    course = tmp_path / "notebooks"
    _answer_notebook(course / "02_ddim_step" / "ddim_step.ipynb", {
        "q_sample": "def q_sample(x, t, scheduler, noise=None):\n    return torch.zeros(1) + 2\n",
        "ddim_solver_step": "def ddim_solver_step(*a):\n    return 'mine'\n",
    })
    assert set(answer_cells(course / "02_ddim_step" / "ddim_step.ipynb")) == {"q_sample", "ddim_solver_step"}
    (course / "04_consistency_loss").mkdir()
    monkeypatch.chdir(course / "04_consistency_loss")
    fns = load_course_functions("04_consistency_loss", ["q_sample", "ddim_solver_step"], make_config())
    assert fns.ddim_solver_step() == "mine"
    assert fns.q_sample(None, None, None).item() == 2.0  # answer cells see torch via helpers.answer_env
    with pytest.raises(LookupError, match="complete those assignments"):
        load_course_functions("04_consistency_loss", ["cm_loss_template"], make_config())
    # under autograde the instructor's solutions are read instead (config.solutions_path)
    graded = make_config(execution="autograde", solutions=str(course))
    assert default_course_dir(graded) == course and default_course_dir(make_config()) == course
    assert load_course_functions("04_consistency_loss", ["q_sample"], graded).q_sample(None, None, None).item() == 2.0


def test_answer_cells_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="finish and save"):
        answer_cells(tmp_path / "missing.ipynb")
    bad = tmp_path / "bad.ipynb"
    bad.write_text('{"cells": [')
    with pytest.raises(ValueError, match="not a valid notebook"):
        answer_cells(bad)


def test_run_mode(make_config):
    interactive = make_config()
    assert interactive.pick(100, reduced_value=10, grading_value=1) == 100
    assert not interactive.grading and interactive.mode == "interactive"
    reduced = make_config(reduced=True)
    assert reduced.pick(100, reduced_value=10, grading_value=1) == 10 and reduced.mode == "reference run (reduced)"
    graded = reduced.replace(execution="autograde")
    assert graded.grading and graded.autograding and graded.mode == "autograde"
    assert graded.pick(100, reduced_value=10, grading_value=1) == 1
    assert graded.pick(100, reduced_value=10) == 10
    validating = make_config(execution="validate")
    assert validating.grading and not validating.autograding


def test_report_merges_and_skips_under_grading(tmp_path, make_config):
    from helpers import report

    config = make_config(out=str(tmp_path))
    report.record_sampler("cd_4", 0.9, 20.0, config, steps=4)
    report.record_timing("train_cd", 12.3456, config)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["samplers"]["cd_4"] == {"prompt_accuracy": 0.9, "fidelity_psnr_db": 20.0, "steps": 4}
    assert data["timings_s"]["train_cd"] == 12.346
    assert report.load_metrics(config) == data
    graded = config.replace(execution="autograde")
    report.record_timing("train_ct", 1.0, graded)
    assert "train_ct" not in json.loads((tmp_path / "metrics.json").read_text())["timings_s"]
    assert report.save_figure(None, "never.png", graded) is None
    assert KitConfig().out_path.parts[-2:] == ("out", "interactive")  # the default output folder


def test_plots_are_saved(tmp_path):
    fig = show_images(torch.rand(3, 3, 8, 8), titles=["a", "b", "c"], save_to=tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0 and len(fig.axes) == 3
    plot_losses({"ct": [1.0, 0.5, 0.25]}, save_to=tmp_path / "l.png")
    assert (tmp_path / "l.png").exists()
    with pytest.raises(ValueError, match="no images"):
        show_images([])


def test_answer_env_progress_bar_stays_off_stderr_while_grading(kit_environ, make_config, capsys):
    # nbgrader fails a test cell that writes to stderr; without ipywidgets tqdm.auto falls back to text.
    from helpers.answer_env import tqdm

    kit_environ(make_config(execution="autograde"))  # an edge: answer cells' tqdm reads the environment
    for _ in tqdm(range(3), desc="training"):
        pass
    captured = capsys.readouterr()
    assert captured.err == "" and "training" in captured.out
    kit_environ(make_config())
    for _ in tqdm(range(3), desc="student"):
        pass
    assert "student" in capsys.readouterr().err  # a student's own run keeps tqdm's default
