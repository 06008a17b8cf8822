"""Which Landlock rules let CUDA start in a forked child (debugging the re-check on a GPU host)."""
import os
import sys

os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
import torch  # noqa: E402

from autograder import landlock  # noqa: E402


def child(variant: str) -> None:
    if variant == "default":
        landlock.confine([*landlock.default_read_roots(), "/tmp"], ["/tmp", "/dev"], ["/nonexistent"])
    elif variant == "root-read":
        landlock.confine(["/"], ["/tmp", "/dev"], ["/nonexistent"])
    elif variant == "root-rw":
        landlock.confine(["/"], ["/"], ["/nonexistent"])
    elif variant.startswith("w:"):  # read everything, write /tmp, /dev and the listed folders
        landlock.confine(["/"], ["/tmp", "/dev", *variant[2:].split(",")], ["/nonexistent"])
    elif variant.startswith("d:"):  # the re-check's reads, write /tmp, /dev and the listed folders
        landlock.confine([*landlock.default_read_roots(), "/tmp"], ["/tmp", "/dev", *variant[2:].split(",")],
                         ["/nonexistent"])
    try:
        x = torch.ones(2, device="cuda")
        print(variant, "ok", float(x.sum()), flush=True)
    except Exception as err:  # noqa: BLE001
        print(variant, "FAILED", str(err)[:200], flush=True)


for variant in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        child(variant)
        os._exit(0)
    os.waitpid(pid, 0)
