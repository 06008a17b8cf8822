"""Re-check the reference and a made-up answer of a few functions on this machine and print the verdicts (used to
debug the re-check on a GPU host: python scripts/gpu_recheck_probe.py)."""
import time

from autograder.forkserver import RecheckClient
from autograder.grade import kit_private_paths
from helpers.course import SOLUTIONS_DIR
from helpers.notebook_functions import source_functions

client = RecheckClient(SOLUTIONS_DIR, ["autograder.checks"], [str(p) for p in kit_private_paths()], timeout_s=120,
                       memory_bytes=None, threads=2, filters=True)
for fn in ("ddim_solver_step", "q_sample", "pseudo_huber_loss", "get_multi_boundary_timesteps"):
    started = time.monotonic()
    verdict = client.check(fn, source_functions(SOLUTIONS_DIR)[fn][1])
    print(fn, verdict.status, round(time.monotonic() - started, 2), verdict.message[:1500], flush=True)
client.close()
