"""TSN and TSM in the shape of the EPIC-Kitchens baselines (epic-kitchens/C1-Action-Recognition-TSN-TRN-TSM).

The network takes ``(N, T, C, H, W)`` clips (one frame per segment), folds the frames into the batch for a 2-D
ResNet, applies one linear head to every frame's pooled features, averages the frame scores (the ``avg``
consensus) and returns the scores of each task (verb, noun) together, as a dict.

Parameter names are those of the baselines' checkpoints (verified against ``src/models/tsn.py``,
``src/models/tsm.py``, ``src/ops/temporal_shift.py`` and ``src/systems.py`` of that repository): the torchvision
ResNet is ``base_model.*`` with its ``fc`` replaced by dropout (no parameters), the head is ``new_fc`` with the
tasks' classes side by side (97 verbs then 300 nouns for EPIC-Kitchens-100, split by offset), and TSM wraps the
first convolution of every residual block in a temporal shift whose inner convolution is ``net``
(``base_model.layer1.0.conv1.net.weight``). Their Lightning checkpoints keep the network under ``model.``,
which :func:`pipeline.models.load_checkpoint` strips.

For saliency the explained layer is ``base_model.layer4`` read with ``model.layout=folded``; the head is linear
in the average of the frames' pooled features, so ``cam`` is exact (the tube is the per-frame CAM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from pipeline.errors import ModelError


class TemporalShift(nn.Module):
    """Shifts a share of the channels along time before ``net`` (TSM, Lin et al., ICCV 2019).

    Of the ``C`` channels of ``(N*T, C, h, w)`` maps, the first ``C // shift_div`` take the next frame's values and
    the following ``C // shift_div`` the previous frame's (zeros at the clip's ends); the rest are unchanged.
    """

    def __init__(self, net: nn.Module, num_segments: int, shift_div: int = 8):
        super().__init__()
        self.net, self.num_segments, self.shift_div = net, int(num_segments), int(shift_div)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        frames = x.view(nt // self.num_segments, self.num_segments, c, h, w)
        fold = c // self.shift_div
        zero = frames.new_zeros(frames.shape[0], 1, fold, h, w)
        back = torch.cat([frames[:, 1:, :fold], zero], dim=1)  # frame t sees frame t + 1
        ahead = torch.cat([zero, frames[:, :-1, fold : 2 * fold]], dim=1)  # frame t sees frame t - 1
        shifted = torch.cat([back, ahead, frames[:, :, 2 * fold :]], dim=2)
        return self.net(shifted.view(nt, c, h, w))


class EpicTSN(nn.Module):
    """TSN (``shift=False``) or TSM (``shift=True``, residual shift in every block) over a torchvision ResNet.

    Args:
        num_classes: classes per task (EPIC-Kitchens-100: ``[97, 300]``).
        tasks: the tasks' names, the keys of the returned dict.
        num_segments: frames per clip.
        backbone: a torchvision ResNet (``resnet50`` in the baselines; ``resnet18`` is lighter).
        shift: insert temporal shifts (TSM).
        shift_div: TSM shifts ``1 / shift_div`` of the channels each way.
        dropout: dropout before the head (the baselines' ``fc`` replacement).
    """

    def __init__(
        self,
        num_classes: Sequence[int] = (97, 300),
        tasks: Sequence[str] = ("verb", "noun"),
        num_segments: int = 8,
        backbone: str = "resnet50",
        shift: bool = False,
        shift_div: int = 8,
        dropout: float = 0.7,
    ):
        super().__init__()
        if isinstance(num_classes, int):
            num_classes = [num_classes]
        if len(tasks) != len(num_classes):
            raise ModelError(
                f"model.net.tasks {list(tasks)} must name each of model.net.num_classes {list(num_classes)}"
            )
        if not backbone.startswith("resnet") or not hasattr(torchvision.models, backbone):
            raise ModelError(
                f"model.net.backbone must be a torchvision ResNet (resnet18 ... resnet152), got {backbone!r}"
            )
        self.tasks, self.sizes, self.num_segments = list(tasks), [int(k) for k in num_classes], int(num_segments)
        self.base_model = getattr(torchvision.models, backbone)(weights=None)
        features = self.base_model.fc.in_features
        self.base_model.fc = nn.Dropout(p=dropout)
        if shift:
            for stage in (
                self.base_model.layer1,
                self.base_model.layer2,
                self.base_model.layer3,
                self.base_model.layer4,
            ):
                for block in stage:
                    block.conv1 = TemporalShift(block.conv1, self.num_segments, shift_div)
        self.new_fc = nn.Linear(features, sum(self.sizes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, t = x.shape[:2]
        if t != self.num_segments:
            raise ModelError(f"{type(self).__name__} takes {self.num_segments} frames per clip, got {t}")
        scores = self.new_fc(self.base_model(x.reshape(n * t, *x.shape[2:]))).view(n, t, -1).mean(1)
        return dict(zip(self.tasks, scores.split(self.sizes, dim=1)))
