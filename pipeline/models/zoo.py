"""Builders of zoo models that need more than their library's constructor called from config.

- :func:`mvit`: torchvision's ``mvit_v1_b`` / ``mvit_v2_s`` always build positional embeddings (v1) or
  relative-position tables (v2) for 16 x 224 x 224 clips; this builds the same architecture for another clip size
  (a model fine-tuned on longer clips, or small clips in tests) by passing the size to torchvision's own builder.
- :func:`hf_video`: a HuggingFace video classifier (VideoMAE, TimeSformer, ViViT) from its config class (random
  weights) or from a local folder (``from_pretrained(..., local_files_only=True)``); needs the ``[hf]`` extra.
- :func:`slowfast`, :func:`x3d`: pytorchvideo's builders with the head's pooling sized for the clip; need the
  ``[pytorchvideo]`` extra.

Every other zoo model is built by its torchvision function (or the project's own class) directly from
``conf/model/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Sequence

from omegaconf import Container, OmegaConf
from torch import nn
from torchvision.models.video import mvit as tv_mvit

from pipeline.models import ModelError

MVIT_ARCHS = ("mvit_v1_b", "mvit_v2_s")
_builder_lock = threading.Lock()


def mvit(
    arch: str, num_classes: int = 400, clip_len: int = 16, size: Sequence[int] = (224, 224), **kwargs
) -> nn.Module:
    """torchvision's MViT ``arch`` (random weights) for clips of ``clip_len`` x ``size``.

    Args:
        arch: ``mvit_v1_b`` or ``mvit_v2_s``.
        num_classes: classifier outputs.
        clip_len: frames per clip (the temporal size the embeddings are built for).
        size: ``(H, W)`` of the clips.
        kwargs: passed to torchvision's builder (e.g. ``dropout``).
    """
    if arch not in MVIT_ARCHS:
        raise ModelError(f"model.net.arch must be one of {MVIT_ARCHS}, got {arch!r}")
    build = tv_mvit._mvit  # the architecture's builders pass a fixed size to this function

    def sized(**settings):
        settings.update(spatial_size=tuple(int(s) for s in size), temporal_size=int(clip_len))
        return build(**settings)

    with _builder_lock:  # the module attribute is swapped only while this thread builds
        tv_mvit._mvit = sized
        try:
            return getattr(tv_mvit, arch)(num_classes=int(num_classes), **kwargs)
        finally:
            tv_mvit._mvit = build


def _optional(module: str, extra: str, what: str):
    """Import ``module`` of an optional extra, or a :class:`ModelError` saying which extra to install."""
    try:
        with warnings.catch_warnings():  # pytorchvideo 0.1.5 warns about torch.jit.script at import
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(module)
    except ImportError as err:
        raise ModelError(f"{what} needs the {extra!r} extra: pip install 'saliency-tubes[{extra}]' ({err})") from err


HF_ARCHS = {
    "videomae": ("VideoMAEConfig", "VideoMAEForVideoClassification"),
    "timesformer": ("TimesformerConfig", "TimesformerForVideoClassification"),
    "vivit": ("VivitConfig", "VivitForVideoClassification"),
}


def hf_video(arch: str, pretrained: str | None = None, **config) -> nn.Module:
    """A HuggingFace video classifier: ``arch``'s model class built from its config class with ``config``
    (random weights), or loaded from the local folder ``pretrained`` (never downloaded; ``config`` then
    overrides the folder's settings).

    Args:
        arch: ``videomae``, ``timesformer`` or ``vivit``.
        pretrained: a local folder saved by ``save_pretrained`` (config.json + weights), or None.
        config: settings of the config class (``num_labels``, ``num_frames``, ``image_size``, ``hidden_size``, ...).
    """
    if arch not in HF_ARCHS:
        raise ModelError(f"model.net.arch must be one of {sorted(HF_ARCHS)}, got {arch!r}")
    transformers = _optional("transformers", "hf", f"model.net.arch={arch}")
    config_class, model_class = (getattr(transformers, name) for name in HF_ARCHS[arch])
    config = {k: OmegaConf.to_container(v) if isinstance(v, Container) else v for k, v in config.items()}
    if pretrained:
        return model_class.from_pretrained(str(pretrained), local_files_only=True, **config)
    return model_class(config_class(**config))


def slowfast(num_classes: int = 400, clip_len: int = 32, size: Sequence[int] = (224, 224), alpha: int = 4, **kwargs):
    """pytorchvideo's SlowFast (``create_slowfast``, ResNet-50 by default) for fast clips of ``clip_len`` x
    ``size``, the slow pathway taking every ``alpha``-th frame; the head's average pools cover each pathway's
    whole last map (``(clip_len / alpha, H / 32, W / 32)`` and ``(clip_len, H / 32, W / 32)``).

    ``kwargs`` go to ``create_slowfast`` (e.g. ``model_depth``, ``stem_dim_outs`` for a narrower model)."""
    module = _optional("pytorchvideo.models.slowfast", "pytorchvideo", "model=slowfast_r50")
    h, w = (int(s) // 32 for s in size)
    pools = ((int(clip_len) // int(alpha), h, w), (int(clip_len), h, w))
    return module.create_slowfast(model_num_class=int(num_classes), head_pool_kernel_sizes=pools, **kwargs)


def x3d(num_classes: int = 400, clip_len: int = 13, size: int = 160, **kwargs):
    """pytorchvideo's X3D (``create_x3d``) for clips of ``clip_len`` x ``size`` x ``size``; the head returns
    logits (no softmax: ``head_activation=None``). X3D-S: 13 x 160, X3D-M: 16 x 224 (same widths and depths).

    ``kwargs`` go to ``create_x3d`` (e.g. ``width_factor``, ``depth_factor``, ``head_dim_out``)."""
    module = _optional("pytorchvideo.models.x3d", "pytorchvideo", "model=x3d_s / x3d_m")
    kwargs.setdefault("head_activation", None)
    return module.create_x3d(
        model_num_class=int(num_classes), input_clip_length=int(clip_len), input_crop_size=int(size), **kwargs
    )
