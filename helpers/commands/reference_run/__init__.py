"""The reference run: execute the solution notebooks 01-05 end to end, check what they recorded and write a
report (``python -m helpers.commands.reference_run --help``).

Three rooms and the command that joins them:

* :mod:`.execute` -- copy ``solutions/`` and run each notebook with nbclient;
* :mod:`.check` -- the consistency checks of ``metrics.json`` (:func:`check_metrics`, :func:`gap_closed`);
* :mod:`.render` -- ``report.md``;
* :mod:`.cli` -- :func:`run` (all three in order) and :func:`main` (the command line).
"""
from helpers.commands.reference_run.check import (EXPECTED_SAMPLERS, FEW_STEP, REFERENCE, check_metrics,
                                                  gap_closed, psnr_cap_db)
from helpers.commands.reference_run.cli import DEFAULT_OUT, RunOutcome, main, run
from helpers.commands.reference_run.execute import (Execution, NotebookResult, environment_info, execute_notebook,
                                                    plain_traceback, select_assignments)
from helpers.commands.reference_run.render import render_report

__all__ = ["EXPECTED_SAMPLERS", "REFERENCE", "FEW_STEP", "DEFAULT_OUT", "NotebookResult", "Execution", "RunOutcome",
           "select_assignments", "execute_notebook", "plain_traceback", "environment_info", "psnr_cap_db", "gap_closed",
           "check_metrics", "render_report", "run", "main"]
