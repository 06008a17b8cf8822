"""The reference run (helpers.commands.reference_run): the runner's mechanics on small synthetic courses, its
consistency checks, and the real reduced run of the kit's solution notebooks end to end."""
from __future__ import annotations

import json
import os
import math
import queue
from pathlib import Path

import nbformat
import pytest

from helpers.commands import reference_run as rr
from helpers.commands.reference_run import render
from helpers.course import ASSIGNMENTS, KIT_ROOT

SETUP = ("from helpers.config import KitConfig\n"
         "from helpers.report import record_sampler, record_timing, record_settings, save_figure\n"
         "CONFIG = KitConfig.from_environ()")


def _write_course(root: Path, cells_by_assignment: dict[str, list[str | tuple[str, str]]]) -> Path:
    """A solutions folder with one notebook per assignment; a cell is source, or (grade_id, source)."""
    for a in ASSIGNMENTS:
        if a.id not in cells_by_assignment:
            continue
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        for cell in cells_by_assignment[a.id]:
            grade_id, src = cell if isinstance(cell, tuple) else (None, cell)
            c = nbformat.v4.new_code_cell(src)
            if grade_id:
                c.metadata["nbgrader"] = {"solution": True, "grade": False, "locked": False,
                                          "grade_id": grade_id, "schema_version": 3}
            nb.cells.append(c)
        (root / a.id).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, root / a.id / a.notebook)
    return root


def _sampler(name: str, acc: float, psnr: str) -> str:
    return f"record_sampler({name!r}, {acc}, {psnr}, CONFIG)"


COMPLETE = {
    "01_model_loading": [
        SETUP,
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(); ax.plot([3, 1, 2]); save_figure(fig, 'loss_ct.png', CONFIG)",
        "from helpers.metrics import psnr_db\nimport torch\nx = torch.rand(2, 3, 8, 8)\n"
        + _sampler("teacher_ddim50", 0.8, "psnr_db(x, x)") + "\n" + _sampler("teacher_ddim4", 0.2, "12.5"),
    ],
    "02_ddim_step": [
        SETUP,
        "import os, pathlib\nrecord_settings('seen_by_kernel', {'cwd': pathlib.Path.cwd().name, "
        "'reduced': os.environ.get('CD_KIT_REDUCED'), 'backend': os.environ.get('MPLBACKEND'), "
        "'model': os.environ.get('CD_KIT_MODEL')}, CONFIG)\nrecord_timing('train_ct', 1.5, CONFIG)",
    ],
    "03_ct_derivation": [SETUP, _sampler("ct_4", 0.5, "14.0")],
    "04_consistency_loss": [SETUP, _sampler("cd_4", 0.65, "15.0")],
    "05_multi_boundary": [SETUP, _sampler("multi_cd_4_pipe", 0.2, "13.0") + "\n"
                          + _sampler("multi_cd_4_matched", 0.8, "16.0")],
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A stand-in model setting: an existing folder (the synthetic notebooks load no model)."""
    return str(tmp_path_factory.mktemp("model"))


def test_complete_synthetic_course_runs_in_order_and_reports(tmp_path, model_folder):
    solutions = _write_course(tmp_path / "solutions", COMPLETE)
    outcome = rr.run(model=model_folder, out=tmp_path / "out", reduced=True, solutions_dir=solutions)

    assert outcome.problems == [], outcome.problems
    assert [r.status for r in outcome.results] == ["ok"] * len(ASSIGNMENTS)
    data = json.loads(outcome.metrics.read_text())
    assert data["settings"]["seen_by_kernel"] == {"cwd": "02_ddim_step", "reduced": "1", "backend": "Agg",
                                                  "model": model_folder}
    assert set(data["samplers"]) == set(rr.EXPECTED_SAMPLERS)
    assert all(data["notebooks"][a.id]["wall_s"] > 0 for a in ASSIGNMENTS)
    executed = nbformat.read(tmp_path / "out" / "notebooks" / "03_ct_derivation" / "ct_derivation.ipynb", 4)
    assert all(c.execution_count for c in executed.cells), "executed copies must be kept"

    report = outcome.report.read_text()
    assert "![loss_ct](figures/loss_ct.png)" in report
    # (0.5 - 0.2) / (0.8 - 0.2) and (0.65 - 0.2) / 0.6 of the teacher's gap, worked out by hand
    assert "| `ct_4` | 0.500 | 14.00 | 50 % |" in report
    assert "| `cd_4` | 0.650 | 15.00 | 75 % |" in report
    assert "| `multi_cd_4_pipe` | 0.200 | 13.00 | 0 % |" in report
    assert "train_ct" in report and "All checks passed." in report


def test_failure_stops_the_run_names_the_cell_and_still_reports(tmp_path, model_folder, capsys):
    course = {"01_model_loading": COMPLETE["01_model_loading"],
              "02_ddim_step": ["x = 1", ("q_sample", "def q_sample():\n    pass\nraise ValueError('broken on purpose')")],
              "03_ct_derivation": ["raise SystemExit('must not run')"]}
    solutions = _write_course(tmp_path / "solutions", course)
    code = rr.main(["--model", model_folder, "--out", str(tmp_path / "out"), "--only", "01,02,03",
                    "--solutions", str(solutions)])

    assert code == 1
    printed = capsys.readouterr()
    assert "[02_ddim_step] FAILED" in printed.out and "02_ddim_step failed at cell 1 (grade_id 'q_sample')" in printed.err
    assert "ValueError: broken on purpose" in printed.err
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [data["notebooks"][a]["status"] for a in ("01_model_loading", "02_ddim_step", "03_ct_derivation")] \
        == ["ok", "failed", "not run"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "grade_id 'q_sample'" in report and "`teacher_ddim50`" in report  # what ran is reported
    saved = nbformat.read(tmp_path / "out" / "notebooks" / "02_ddim_step" / "ddim_step.ipynb", 4)
    assert saved.cells[1].outputs[-1]["ename"] == "ValueError", "the failing copy keeps its traceback"


def test_missing_notebooks_are_listed_not_fatal(tmp_path, model_folder):
    solutions = _write_course(tmp_path / "solutions", {"01_model_loading": [SETUP, _sampler("teacher_ddim4", 0.3, "11.0")]})
    (tmp_path / "out" / "figures").mkdir(parents=True)
    (tmp_path / "out" / "figures" / "stale.png").write_bytes(b"old run")
    (tmp_path / "out" / "keep.txt").write_text("not the run's")
    outcome = rr.run(model=model_folder, out=tmp_path / "out", solutions_dir=solutions)

    assert outcome.problems == [] and [r.status for r in outcome.results][1:] == ["missing"] * 4
    assert "Missing from `solutions/` (not run): 02_ddim_step, 03_ct_derivation" in outcome.report.read_text()
    assert not (tmp_path / "out" / "figures" / "stale.png").exists(), "a run starts afresh"
    assert (tmp_path / "out" / "keep.txt").exists(), "a run deletes only what it produces"


# ------------------------------------------------------------------------------------------ checks
def _good() -> dict:
    return {"samplers": {"teacher_ddim50": {"prompt_accuracy": 0.9, "fidelity_psnr_db": 100.0},
                         "teacher_ddim4": {"prompt_accuracy": 0.4, "fidelity_psnr_db": 15.0},
                         "ct_4": {"prompt_accuracy": 0.5, "fidelity_psnr_db": 14.0},
                         "cd_4": {"prompt_accuracy": 0.7, "fidelity_psnr_db": 17.0},
                         "multi_cd_4_pipe": {"prompt_accuracy": 0.6, "fidelity_psnr_db": 16.0},
                         "multi_cd_4_matched": {"prompt_accuracy": 0.8, "fidelity_psnr_db": 18.0}},
            "timings_s": {"train_cd": 12.0}}


def test_check_metrics_accepts_a_consistent_run():
    assert rr.check_metrics(_good(), complete=True, cap_db=100.0, figures=[Path("grid.png")]) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["samplers"].pop("cd_4"), "samplers missing"),
    (lambda d: d["samplers"]["ct_4"].update(prompt_accuracy=1.5), "ct_4: prompt_accuracy"),
    (lambda d: d["samplers"]["ct_4"].update(prompt_accuracy=math.nan), "ct_4: prompt_accuracy"),
    (lambda d: d["samplers"]["cd_4"].update(fidelity_psnr_db=None), "cd_4: fidelity_psnr_db"),
    (lambda d: d["samplers"]["cd_4"].update(fidelity_psnr_db=-3.0), "cd_4: fidelity_psnr_db"),
    (lambda d: d["samplers"]["teacher_ddim50"].update(fidelity_psnr_db=30.0), "fidelity against itself"),
    (lambda d: d["samplers"]["cd_4"].update(fidelity_psnr_db=100.0), "cd_4: fidelity equals the cap"),
    (lambda d: d["timings_s"].update(train_ct=-1), "timing 'train_ct'"),
])
def test_check_metrics_catches_each_inconsistency(mutate, expected):
    data = _good()
    mutate(data)
    problems = rr.check_metrics(data, complete=True, cap_db=100.0, figures=[Path("grid.png")])
    assert any(expected in p for p in problems), problems


def test_check_metrics_needs_all_samplers_and_figures_only_when_complete():
    partial = {"samplers": {"teacher_ddim4": {"prompt_accuracy": 0.4, "fidelity_psnr_db": 15.0}}}
    assert rr.check_metrics(partial, complete=False, cap_db=100.0) == []
    problems = rr.check_metrics(partial, complete=True, cap_db=100.0)
    assert any("samplers missing" in p for p in problems) and any("no figures" in p for p in problems)


def test_psnr_cap_is_what_the_metric_gives_identical_images():
    from helpers.metrics import psnr_db
    import torch

    x = torch.rand(3, 3, 16, 16)
    assert rr.psnr_cap_db() == psnr_db(x, x.clone())


def test_gap_closed_by_hand_and_undefined_cases():
    samplers = _good()["samplers"]  # teachers 0.4 -> 0.9: a gap of 0.5
    gaps = rr.gap_closed(samplers)
    assert gaps["cd_4"] == pytest.approx(0.6) and gaps["ct_4"] == pytest.approx(0.2)
    assert gaps["teacher_ddim4"] == 0 and gaps["teacher_ddim50"] == 1
    samplers["teacher_ddim4"]["prompt_accuracy"] = 0.9
    assert set(rr.gap_closed(samplers).values()) == {None}
    samplers["teacher_ddim4"]["prompt_accuracy"] = 1.0  # the 4-step teacher better than the 50-step one
    assert set(rr.gap_closed(samplers).values()) == {None}
    assert "no accuracy gap to close" in "\n".join(render._metrics_section(samplers))


def test_report_says_which_students_beat_the_4_step_teacher():
    samplers = {"teacher_ddim50": {"prompt_accuracy": 0.9, "fidelity_psnr_db": 100.0},
                "teacher_ddim4": {"prompt_accuracy": 0.5, "fidelity_psnr_db": 20.0},
                "cd_4": {"prompt_accuracy": 0.75, "fidelity_psnr_db": 21.5},
                "ct_4": {"prompt_accuracy": 0.75, "fidelity_psnr_db": 12.0},
                "multi_cd_4_pipe": {"prompt_accuracy": 0.5, "fidelity_psnr_db": 19.0}}
    table = "\n".join(render._metrics_section(samplers))
    assert "| `cd_4` | 0.750 | 21.50 | 62 % | +0.250, +1.50 dB: beats it on both |" in table
    assert "| `ct_4` | 0.750 | 12.00 | 62 % | +0.250, -8.00 dB: beats it on accuracy |" in table
    assert "| `multi_cd_4_pipe` | 0.500 | 19.00 | 0 % | +0.000, -1.00 dB: does not beat it |" in table


def test_select_assignments():
    assert [a.id for a in rr.select_assignments("01,03")] == ["01_model_loading", "03_ct_derivation"]
    assert len(rr.select_assignments(None)) == len(ASSIGNMENTS)
    with pytest.raises(ValueError, match="no such assignment"):
        rr.select_assignments("07")


# ------------------------------------------------------------------------------------------ the real run
@pytest.mark.slow
def test_reduced_reference_run_of_the_kits_notebooks(tmp_path, capsys):
    """The README's main command in CI's reduced mode, on the shipped small model (or $CD_KIT_MODEL)."""
    present = [a for a in ASSIGNMENTS if (KIT_ROOT / "solutions" / a.id / a.notebook).exists()]
    if not present:
        pytest.skip("solutions/ holds no notebook yet")
    code = rr.main(["--out", str(tmp_path), "--reduced"])
    assert code != 2, capsys.readouterr().err  # the run could not start (e.g. the small model is missing)
    report, metrics = tmp_path / "report.md", tmp_path / "metrics.json"
    assert report.exists() and metrics.exists()
    data = json.loads(metrics.read_text())
    assert code == 0, report.read_text().split("## Consistency checks")[-1]
    assert [data["notebooks"][a.id]["status"] for a in present] == ["ok"] * len(present)
    if len(present) == len(ASSIGNMENTS):  # the course is complete: every sampler and the report table
        assert set(rr.EXPECTED_SAMPLERS) <= set(data["samplers"])
        assert all(f"| `{s}` |" in report.read_text() for s in rr.EXPECTED_SAMPLERS)
        # the lesson: DDIM at 1, 2, 4, 8, 50 steps, the steps-quality plot, the grid and a sentence per student
        assert {f"teacher_ddim{k}" for k in (1, 2, 4, 8, 50)} <= set(data["samplers"])
        assert {"lesson_steps_quality.png", "lesson_grid.png"} <= {p.name for p in (tmp_path / "figures").iterdir()}
        assert "### What distillation bought" in report.read_text() and "`multi_cd_4_matched` against" in report.read_text()


def test_kernel_env_carries_the_run_settings_and_drops_nbgrader():
    from helpers.commands.reference_run.execute import kernel_env
    from helpers.config import KitConfig

    base = {"PATH": "/usr/bin", "NBGRADER_EXECUTION": "autograde", "CD_KIT_REDUCED": "1", "MPLBACKEND": "TkAgg"}
    env = kernel_env(KitConfig(model="small", out="/tmp/o"), base)
    assert env == {"PATH": "/usr/bin", "CD_KIT_MODEL": "small", "CD_KIT_OUT": "/tmp/o", "MPLBACKEND": "Agg"}
    env = kernel_env(KitConfig(model="sd15", out="/tmp/o", reduced=True, execution="validate"), base)
    assert env["CD_KIT_REDUCED"] == "1" and "NBGRADER_EXECUTION" not in env and env["CD_KIT_MODEL"] == "sd15"


def test_kernels_get_one_cpu_thread_when_other_load_is_on_the_cores():
    """docs/bench/omp_wait_policy.json: spinning OpenMP threads lose against other load; one thread does not."""
    from helpers.device import busy_cores, cpu_threads_env

    base = {"PATH": "/usr/bin"}
    assert cpu_threads_env(base, busy=0.1) == base, "a quiet machine keeps PyTorch's threads"
    assert cpu_threads_env(base, busy=1.3) == {**base, "OMP_NUM_THREADS": "1"}
    for own in ({"OMP_NUM_THREADS": "2"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        assert cpu_threads_env({**base, **own}, busy=1.9) == {**base, **own}, "the user's own choice stays"
    measured = busy_cores(0.05)
    assert measured is None or 0.0 <= measured <= (os.cpu_count() or 1) + 1e-6


# ------------------------------------------------------------------------------------------ failures carry tracebacks
FAILING = {"01_model_loading": COMPLETE["01_model_loading"],
           "02_ddim_step": ["def raising_function_xyz():\n    assert 1 + 1 == 3", "import math\nraising_function_xyz()"]}


def _error_outputs(notebook: Path, index: int) -> list[str]:
    """The ANSI-free tracebacks of cell ``index``'s error outputs in a saved notebook."""
    cell = nbformat.read(notebook, 4).cells[index]
    return [rr.plain_traceback(o["traceback"]) for o in cell.outputs if o["output_type"] == "error"]


def test_a_failing_cells_traceback_is_in_the_summary_the_report_and_the_executed_copy(tmp_path, model_folder, capsys):
    out = tmp_path / "out"
    code = rr.main(["--model", model_folder, "--out", str(out), "--only", "01,02",
                    "--solutions", str(_write_course(tmp_path / "solutions", FAILING))])

    assert code == 1
    err = capsys.readouterr().err
    # the raising function appears only in the traceback (the failing cell's first line is "import math")
    assert "in raising_function_xyz" in err and "assert 1 + 1 == 3" in err
    assert "02_ddim_step failed at cell 1: import math -> AssertionError (no message), raised at" in err
    report = (out / "report.md").read_text()
    failures = report.split("## Failures", 1)[1].split("## Metrics", 1)[0]
    assert "in raising_function_xyz" in failures and "assert 1 + 1 == 3" in failures
    assert "\x1b[" not in report, "tracebacks in the report are plain text"
    data = json.loads((out / "metrics.json").read_text())
    assert "in raising_function_xyz" in data["notebooks"]["02_ddim_step"]["traceback"]
    assert any("in raising_function_xyz" in tb for tb in _error_outputs(out / "notebooks/02_ddim_step/ddim_step.ipynb", 1))


def test_an_error_of_the_runner_itself_is_recorded_with_its_traceback(tmp_path, model_folder, capsys):
    """A dead kernel: nbclient raises in this process and the kernel reports nothing; the runner's traceback
    stands in the summary, the report and the executed copy."""
    out = tmp_path / "out"
    course = {"01_model_loading": ["x = 1", "import os\nos._exit(1)"]}
    code = rr.main(["--model", model_folder, "--out", str(out), "--only", "01",
                    "--solutions", str(_write_course(tmp_path / "solutions", course))])

    assert code == 1
    err = capsys.readouterr().err
    assert "01_model_loading failed at cell 1: import os -> DeadKernelError" in err
    assert "not by the cell's code" in err and "nbclient" in err
    report = (out / "report.md").read_text()
    assert "DeadKernelError" in report.split("## Failures", 1)[1] and "not by the cell's code" in report
    saved = _error_outputs(out / "notebooks/01_model_loading/model_loading.ipynb", 1)
    assert saved and "DeadKernelError" in saved[-1], "the executed copy carries the runner's traceback"


def test_an_early_wakeup_while_waiting_for_a_cell_is_waited_out(tmp_path, model_folder, monkeypatch):
    """Regression (issue 15): jupyter_client's shell get_msg raised Empty before any reply came (pyzmq's poll
    woke without a message); nbclient, with no cell timeout, then failed on a bare ``assert timeout is not
    None`` in this process: ``AssertionError:``, and no traceback anywhere. Simulated: one early Empty."""
    import zmq
    from jupyter_client.channels import AsyncZMQSocketChannel

    get_msg, woken = AsyncZMQSocketChannel.get_msg, []

    async def wakes_early_once(self, timeout=None):
        if timeout is None and self.socket.type == zmq.DEALER and not woken:  # the shell channel, in a cell
            woken.append(True)
            raise queue.Empty
        return await get_msg(self, timeout)

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", wakes_early_once)
    solutions = _write_course(tmp_path / "solutions", {"01_model_loading": ["import time\ntime.sleep(0.5)", "y = 2"]})
    outcome = rr.run(model=model_folder, out=tmp_path / "out", solutions_dir=solutions, only="01")

    assert woken, "the simulated early wake-up did not happen: the test no longer exercises nbclient's wait"
    assert [r.status for r in outcome.results] == ["ok"], outcome.results[0].error
