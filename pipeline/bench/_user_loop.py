"""The loop a user writes today, the baseline of the end-to-end benchmarks: PyAV per clip, resize and crop,
pytorch-grad-cam's Grad-CAM, one ``np.save`` per clip, one process.

``python -m pipeline.bench._user_loop SETTINGS_JSON`` (index, out_dir, net, net_args, checkpoint, layer,
short_side, size, mean, std) runs it as a whole process (so that its imports are timed too); :func:`user_loop` is
the loop itself. It reads only ``source`` and ``frame_indices`` of an index file (what a user would list
themselves) and imports nothing of this project but the model class it is given. For a network that pools its
last layer into a linear head, Grad-CAM's map is CAM's (the gradient is the classifier row over the number of
positions), so the same loop is the baseline of ``method=cam`` too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def user_loop(net, layer, rows, short: int, size: tuple[int, int], mean, std, out_dir: Path) -> float:
    """Explain every clip of ``rows`` (``source``, ``frame_indices``) one at a time; returns the loop's seconds."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM

    mean = torch.tensor(mean).view(3, 1, 1, 1)
    std = torch.tensor(std).view(3, 1, 1, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with GradCAM(model=net, target_layers=[layer]) as cam:
        for n, (source, indices) in enumerate(zip(rows["source"], rows["frame_indices"])):
            wanted = list(map(int, indices))
            frames = {}
            with av.open(str(source)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        frames[i] = frame.to_ndarray(format="rgb24")
                    if i >= max(wanted):
                        break
            clip = torch.from_numpy(np.stack([frames[i] for i in wanted])).permute(3, 0, 1, 2).float() / 255
            h, w = clip.shape[2:]
            scale = short / min(h, w)
            clip = F.interpolate(clip, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
            top, left = (clip.shape[2] - size[0]) // 2, (clip.shape[3] - size[1]) // 2
            clip = (clip[:, :, top : top + size[0], left : left + size[1]] - mean) / std
            np.save(out_dir / f"clip-{n:06d}.npy", cam(input_tensor=clip[None], targets=None))
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    import json

    import pyarrow.parquet as pq
    import torch
    from hydra.utils import get_class

    s = json.loads(argv[0])
    net = get_class(s["net"])(**s["net_args"]).eval()
    net.load_state_dict(torch.load(s["checkpoint"], weights_only=True))
    rows = pq.read_table(s["index"], columns=["source", "frame_indices"]).to_pydict()
    layer = net.get_submodule(s["layer"])
    seconds = user_loop(net, layer, rows, int(s["short_side"]), tuple(s["size"]), s["mean"], s["std"], s["out_dir"])
    print(f"user loop: {len(rows['source'])} clips in {seconds:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
