"""The report's lesson (issue 16), built from a tiny hand-written metrics.json: the sentences per student, the
steps-quality plot and the DDIM-4 / best student / DDIM-50 grid."""
from __future__ import annotations

import re

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from helpers import report  # noqa: E402
from helpers.commands.reference_run.render import render_report  # noqa: E402
from helpers.plotting import plot_steps_quality  # noqa: E402

NET = "digit classifier (64-D pooled features)"


def _entry(steps, fd=None, psnr=None, acc=None, images=500):
    metrics = {}
    if fd is not None:
        metrics["fd_teacher_split"] = {"key": "fd_teacher_split", "value": fd, "images": images, "network": NET,
                                       "against": "teacher_ddim50 of the other half of the noises",
                                       "reference_images": images // 2}
    if psnr is not None:
        metrics["psnr_teacher"] = {"key": "psnr_teacher", "value": psnr, "images": images}
    if acc is not None:
        metrics["prompt_accuracy"] = {"key": "prompt_accuracy", "value": acc, "images": images}
    return {"steps": steps, "images": images, "seconds": 1.0, "metrics": metrics, "prompt_accuracy": acc,
            "fidelity_psnr_db": psnr}


def _samplers(images=500):
    return {
        "teacher_ddim1": _entry(1, 0.760, 13.70, 0.963, images), "teacher_ddim2": _entry(2, 0.580, 15.30, 0.991, images),
        "teacher_ddim4": _entry(4, 0.180, 20.18, 0.998, images), "teacher_ddim8": _entry(8, 0.066, 28.17, 0.998, images),
        "teacher_ddim50": _entry(50, 0.054, 100.0, 0.998, images),
        "multi_cd_4_matched": _entry(4, 0.085, 21.99, 0.996, images),
        "cd_4": _entry(4, 0.170, 16.75, 0.982, images),
        "ct_4": _entry(4, 0.900, 11.00, 0.450, images),
    }


def test_sentences_say_by_how_much_each_student_beats_or_trails_ddim_at_its_steps_with_the_spread():
    lines = {line.split("`")[1]: line for line in report.lesson_sentences(_samplers())}
    matched = lines["multi_cd_4_matched"]
    # 0.180 - 0.085 = 0.095 = 9.9 x the quoted 0.0096; (0.180 - 0.085) / (0.180 - 0.054) = 75 % of the gap
    assert "beats it on FD vs DDIM-50 of other noise by 0.095" in matched and "9.9 ×" in matched
    assert "closing 75 % of its gap to DDIM-50" in matched
    # 21.99 - 20.18 = 1.81 dB = 5.1 x the quoted 0.357 dB
    assert "beats it on PSNR vs DDIM-50 by 1.81 dB" in matched and "5.1 ×" in matched
    assert "teacher_ddim4" in matched
    assert "PSNR does not judge it" in lines["cd_4"] and "by 0.010" in lines["cd_4"], "stochastic: FD only"
    assert "trails it on FD vs DDIM-50 of other noise by 0.720" in lines["ct_4"]
    assert set(lines) == {"multi_cd_4_matched", "cd_4", "ct_4"}, "the teacher's own DDIM samplers get no sentence"
    assert report.best_student(_samplers()) == "multi_cd_4_matched"


def test_the_quoted_spread_applies_only_to_the_500_image_digit_evaluation():
    assert report.quoted_spread(_samplers()) is not None
    assert report.quoted_spread(_samplers(images=100)) is None
    small = report.lesson_sentences(_samplers(images=100))
    assert all("spread not measured" in line for line in small if "beats" in line or "trails" in line)
    text = render_report({"samplers": _samplers()}, [], [], [])
    assert "### What distillation bought" in text and "docs/small_model.md" in text


def test_steps_quality_plot_draws_ddim_as_a_line_and_psnr_for_deterministic_students_only():
    samplers = _samplers()
    fig = plot_steps_quality(report.teacher_curve(samplers), report.students(samplers),
                             report.quoted_spread(samplers), report.STOCHASTIC_SAMPLERS)
    fd_ax, acc_ax, psnr_ax = fig.axes
    labels = lambda ax: {t.get_label() for t in ax.lines if not t.get_label().startswith("_")}  # noqa: E731
    assert {"multi_cd_4_matched", "cd_4", "ct_4"} <= labels(fd_ax)
    assert "multi_cd_4_matched" in labels(psnr_ax) and not {"cd_4", "ct_4"} & labels(psnr_ax)
    ddim_psnr, ddim_fd = psnr_ax.containers[0], fd_ax.containers[0]  # the teacher's DDIM, with error bars
    assert ddim_psnr.get_label() == ddim_fd.get_label() == "teacher DDIM"
    assert list(ddim_psnr.lines[0].get_xdata()) == [1, 2, 4, 8], "no 50-step PSNR: the reference itself (the cap)"
    assert list(ddim_fd.lines[0].get_xdata()) == [1, 2, 4, 8, 50]
    assert list(ddim_fd.lines[0].get_ydata())[2] == pytest.approx(0.180) and ddim_fd.has_yerr
    assert fd_ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="has a value"):
        plot_steps_quality({4: {}}, {})


def test_lesson_figures_draw_the_plot_and_the_same_noise_grid_from_the_run_folder(tmp_path):
    data = {"samplers": _samplers()}
    for i, name in enumerate(["teacher_ddim4", "multi_cd_4_matched", "teacher_ddim50"]):
        (tmp_path / "samples").mkdir(exist_ok=True)
        torch.save({"images": torch.full((10, 3, 8, 8), 60 * i, dtype=torch.uint8),
                    "labels": [f"digit {d}" for d in range(10)], "eval_key": "abc"}, tmp_path / "samples" / f"{name}.pt")
    written = report.lesson_figures(data, tmp_path)
    assert sorted(p.name for p in written) == ["lesson_grid.png", "lesson_steps_quality.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    # another run's rows (other noise) are never put side by side
    torch.save({"images": torch.zeros(10, 3, 8, 8, dtype=torch.uint8), "labels": ["x"] * 10, "eval_key": "other"},
               tmp_path / "samples" / "teacher_ddim50.pt")
    (tmp_path / "figures" / "lesson_grid.png").unlink()
    assert [p.name for p in report.lesson_figures(data, tmp_path)] == ["lesson_steps_quality.png"]
    assert report.lesson_figures({"samplers": {}}, tmp_path / "empty") == []
    bare = {"samplers": {"teacher_ddim4": {"steps": 4}, "cd_4": {"steps": 4}}}  # recorded without metrics
    assert report.lesson_figures(bare, tmp_path / "bare") == []
    assert re.match(r"teacher_ddim\d+$", "teacher_ddim50")


def test_a_student_keeps_its_marker_and_colour_in_every_panel():
    samplers = _samplers()
    fig = plot_steps_quality(report.teacher_curve(samplers), report.students(samplers), None,
                             report.STOCHASTIC_SAMPLERS)
    looks = [{line.get_label(): (line.get_marker(), line.get_color()) for line in ax.lines} for ax in fig.axes]
    assert looks[0]["multi_cd_4_matched"] == looks[2]["multi_cd_4_matched"] != looks[0]["cd_4"]
