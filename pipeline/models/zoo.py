"""Builders of zoo models that torchvision does not expose with the input size as an argument.

torchvision's ``mvit_v1_b`` / ``mvit_v2_s`` always build positional embeddings (v1) or relative-position tables
(v2) for 16 x 224 x 224 clips. :func:`mvit` builds the same architecture for another clip size (a model
fine-tuned on longer clips, or small clips in tests) by passing the size to torchvision's own builder. Every
other zoo model is built by its torchvision function directly from ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

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
