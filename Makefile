# The kit's commands. The README shows two: `make run` (the reference run) and `make test`.
# Each recipe is one plain command, so without make, type the line under the target yourself
# (after creating .venv as the `venv` recipe does).
#   make run                          solutions 01-05 end to end on the shipped small model -> out/reference/
#   make run MODEL=sd15               the same on Stable Diffusion 1.5 (GPU, weights in the HF cache; data: docs/data.md)
#   make run ARGS="--reduced --only 01,02"   any option of `python -m helpers.commands.reference_run --help`
#   make test [ARGS="-k captions"]    the test suite (pytest)
#   make release                      regenerate the student notebooks (notebooks/) from solutions/
#   make lab                          JupyterLab for students on notebooks/ (python -m helpers.commands.lab)
#   make formgrader [GRADES=grades]   JupyterLab with nbgrader's formgrader on `python -m autograder grade ... --out grades`
#   make venv                         create .venv and install the kit, pip install -e ".[all]" -c constraints.txt
#                                     (the targets above do it when needed)

PYTHON ?= python3
VENV   ?= .venv
MODEL  ?=
OUT    ?= out/reference
GRADES ?= grades
ARGS   ?=
PY     := $(VENV)/bin/python

.PHONY: venv run test release lab formgrader

venv: $(VENV)/.installed

# The exact tested set of constraints.txt, all extras but [browser] (pyproject.toml's ranges, that lock's pins).
# Re-installs when either file changes; needs a package index the first time (about 1.7 GiB, 2-3 minutes).
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "The kit needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0] + ": run make PYTHON=python3.11 (or newer)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[all]" -c constraints.txt
	touch $@

run: venv
	MPLBACKEND=Agg $(PY) -m helpers.commands.reference_run $(if $(MODEL),--model $(MODEL)) --out $(OUT) $(ARGS)

# In CI (CI set) or with BROWSER=1 the browser test's Chromium + Playwright are installed first; elsewhere the
# browser test skips with a message saying how to run it.
test: venv
	$(if $(or $(CI),$(BROWSER)),bash scripts/setup_browser_test.sh)
	MPLBACKEND=Agg $(PY) -m pytest $(ARGS)

release: venv
	$(PY) -m autograder release

lab: venv
	$(PY) -m helpers.commands.lab $(if $(MODEL),--model $(MODEL)) $(ARGS)

formgrader: venv
	$(PY) -m autograder.lab --grades $(GRADES) $(ARGS)
