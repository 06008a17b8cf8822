"""scripts/profile_course.py: its plans, its summary statistics and the kernel hook (the GPU runs are recorded in
docs/benchmarks.md; here only what a CPU can check quickly)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_course.py"


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("profile_course", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_course"] = module
    spec.loader.exec_module(module)
    return module


def test_the_final_plan_measures_the_issue_figures(pc):
    parts = pc.plan("final")
    assert [(k, w["profile"], w["reduced"], w["cap_gib"]) for k, w, _ in parts] == [
        ("notebooks", "fast", False, None), ("notebooks", "low-memory", True, 14.5)]
    assert parts[1][1]["only"] == "05", "04 passed under the cap already (docs/benchmarks.md); 05 is re-run"
    with pytest.raises(ValueError, match="unknown plan"):
        pc.plan("everything")


def test_diagnose_compares_the_profiles_and_names_each_part_once(pc):
    parts = pc.plan("diagnose")
    names = [w.name if k == "phase" else k if k == "vae" else f"notebooks-{w['profile']}" for k, w, _ in parts]
    assert len(names) == len(set(names))
    profiles = {w.profile for k, w, _ in parts if k == "phase"}
    assert profiles == {"course", "fast", "low-memory"}
    capped = [w for k, w, _ in parts if k == "phase" and w.profile == "low-memory"]
    assert capped and all(w.memory_cap_gib == 14.5 for w in capped), "the T4 profile runs under a T4's memory"


def test_spread_reports_median_quartiles_and_range(pc):
    s = pc.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["n"], s["median_s"], s["min_s"], s["max_s"]) == (5, 3.0, 1.0, 5.0)
    assert s["q1_s"] <= s["median_s"] <= s["q3_s"]
    assert pc.spread([]) == {"n": 0}


def test_kernel_hook_is_valid_python_that_logs_every_cell(pc):
    compile(pc.KERNEL_HOOK, "00-memory.py", "exec")
    assert "post_run_cell" in pc.KERNEL_HOOK and "set_per_process_memory_fraction" in pc.KERNEL_HOOK


def test_the_compile_plans_measure_each_mode_cold_and_warm_and_the_notebook_with_all(pc):
    runs = pc.EVAL_COMPILE_RUNS
    assert {m for m, _, _ in runs} == {"off", "vae", "all"}, "every mode of CD_KIT_EVAL_COMPILE"
    for mode, cache, _ in runs:
        if cache == "warm":
            assert runs.index((mode, "cold", 64)) < runs.index((mode, cache, _)), "a warm run follows its cold one"
    (kind, what, _), = pc.plan("final-compile")
    assert kind == "notebooks" and what["env"] == {"CD_KIT_EVAL_COMPILE": "all"} and not what["reduced"]
    names = [w.name for k, w, _ in pc.plan("compile-all") if k == "phase"]
    assert names == ["fast-regional-compile", "fast-regional-compile-warm"]
