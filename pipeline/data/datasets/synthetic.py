"""A synthetic action dataset with known ground truth, written as real H.264 videos in UCF-101 layout.

Each video shows one red disc (the actor) among distractor shapes of other colours on a textured background.
The class is the direction the red disc moves; distractors move too (in random directions, or with
``distractor_motion="actions"`` each along one of the class directions, so that motion alone says nothing and
only the red disc's tells the class), so the only evidence for the class is the red disc, and a faithful
saliency tube must follow it. ``boxes.csv`` gives the disc's box in every frame, in source pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.datasets.ucf101 import UCF101
from pipeline.data.video import write_video
from pipeline.errors import DatasetError

#: class name -> unit direction (dx, dy) of the actor's motion, in image coordinates
DIRECTIONS = {
    "MoveRight": (1.0, 0.0),
    "MoveLeft": (-1.0, 0.0),
    "MoveDown": (0.0, 1.0),
    "MoveUp": (0.0, -1.0),
}
ACTOR_COLOUR = (220, 40, 40)
DISTRACTOR_COLOURS = [(40, 90, 220), (40, 190, 80), (230, 200, 40), (200, 80, 220)]


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides the generated dataset; a dataset on disk is reused only if its spec matches."""

    seed: int = 0
    groups: int = 10
    clips_per_group: int = 6
    test_groups: int = 3
    width: int = 128
    height: int = 96
    min_frames: int = 30
    max_frames: int = 40
    fps: float = 25.0
    distractors: int = 3
    actor_radius: tuple[int, int] = (6, 8)
    speed: tuple[float, float] = (1.0, 1.7)
    distractor_motion: str = "random"  # random | actions (each distractor moves along a class direction)


#: spec fields added later: recorded in synthetic.json only when not at their default, so that datasets written
#: before they existed are still recognised
_LATER_FIELDS = {"distractor_motion": "random"}
MOTIONS = ("random", "actions")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.uniform(50, 90, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = (xx / width * rng.uniform(-20, 20) + yy / height * rng.uniform(-20, 20))[..., None]
    noise = rng.normal(0, 6, size=(height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:height, :width]
    return np.clip(base + gradient + noise, 0, 255)


def _draw_disc(image: np.ndarray, cx: float, cy: float, radius: float, colour) -> None:
    yy, xx = np.ogrid[0 : image.shape[0], 0 : image.shape[1]]
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = colour


def _draw_square(image: np.ndarray, cx: float, cy: float, radius: float, colour) -> None:
    h, w = image.shape[:2]
    y0, y1 = int(max(0, cy - radius)), int(min(h, cy + radius + 1))
    x0, x1 = int(max(0, cx - radius)), int(min(w, cx + radius + 1))
    image[y0:y1, x0:x1] = colour


def render_video(spec: SyntheticSpec, direction: tuple[float, float], rng: np.random.Generator):
    """One video's frames ``(T, H, W, 3)`` uint8 and the actor's boxes ``(T, 4)`` as x0, y0, x1, y1."""
    num_frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    radius = float(rng.integers(spec.actor_radius[0], spec.actor_radius[1] + 1))
    speed = float(rng.uniform(*spec.speed))
    travel = speed * (num_frames - 1)
    # keep the actor inside the centred square every model sees after a centre crop
    side = min(spec.width, spec.height)
    lo_x, hi_x = (spec.width - side) / 2 + radius + 2, (spec.width + side) / 2 - radius - 2
    lo_y, hi_y = (spec.height - side) / 2 + radius + 2, (spec.height + side) / 2 - radius - 2
    dx, dy = direction
    start_x = rng.uniform(lo_x + max(0.0, -dx * travel), hi_x - max(0.0, dx * travel))
    start_y = rng.uniform(lo_y + max(0.0, -dy * travel), hi_y - max(0.0, dy * travel))

    background = _background(rng, spec.height, spec.width)
    distractors = []
    for k in range(spec.distractors):
        if spec.distractor_motion == "actions":
            angle = float(np.arctan2(*list(DIRECTIONS.values())[int(rng.integers(0, len(DIRECTIONS)))][::-1]))
        else:
            angle = rng.uniform(0, 2 * np.pi)
        distractors.append(
            dict(
                x=rng.uniform(0, spec.width),
                y=rng.uniform(0, spec.height),
                vx=np.cos(angle) * rng.uniform(*spec.speed),
                vy=np.sin(angle) * rng.uniform(*spec.speed),
                radius=float(rng.integers(spec.actor_radius[0], spec.actor_radius[1] + 1)),
                colour=DISTRACTOR_COLOURS[k % len(DISTRACTOR_COLOURS)],
                square=bool(rng.integers(0, 2)),
            )
        )
    frames = np.empty((num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    boxes = np.empty((num_frames, 4), dtype=np.float32)
    for t in range(num_frames):
        image = background + rng.normal(0, 3, size=background.shape)
        for d in distractors:
            (_draw_square if d["square"] else _draw_disc)(image, d["x"], d["y"], d["radius"], d["colour"])
            d["x"], d["y"] = d["x"] + d["vx"], d["y"] + d["vy"]
            if not 0 <= d["x"] < spec.width:
                d["vx"] = -d["vx"]
            if not 0 <= d["y"] < spec.height:
                d["vy"] = -d["vy"]
        cx, cy = start_x + dx * speed * t, start_y + dy * speed * t
        _draw_disc(image, cx, cy, radius, ACTOR_COLOUR)
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
        boxes[t] = (cx - radius, cy - radius, cx + radius + 1, cy + radius + 1)
    return frames, boxes


def generate(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Write the dataset under ``root`` (skipped when a dataset with the same spec is already there)."""
    root = Path(root)
    spec_file = root / "synthetic.json"
    if spec.distractor_motion not in MOTIONS:
        raise DatasetError(f"dataset.distractor_motion must be one of {MOTIONS}, got {spec.distractor_motion!r}")
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(spec))).items() if _LATER_FIELDS.get(k, object()) != v}
    if spec_file.is_file() and json.loads(spec_file.read_text()) == wanted:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    classes = list(DIRECTIONS)
    (root / "classInd.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes, start=1)))
    train, test, box_rows = [], [], ["video_id,frame,x0,y0,x1,y1\n"]
    jobs = [(c, g, k) for c in classes for g in range(1, spec.groups + 1) for k in range(1, spec.clips_per_group + 1)]
    for class_name, group, clip in tqdm(jobs, desc="synthetic videos", disable=not progress, unit="video"):
        video_id = f"v_{class_name}_g{group:02d}_c{clip:02d}"
        relative = f"{class_name}/{video_id}.mp4"
        frames, boxes = render_video(spec, DIRECTIONS[class_name], rng)
        write_video(root / relative, frames, spec.fps, crf="18", preset="veryfast")
        if group <= spec.test_groups:
            test.append(f"{relative}\n")
        else:
            train.append(f"{relative} {classes.index(class_name) + 1}\n")
        box_rows.extend(f"{video_id},{t},{b[0]:.2f},{b[1]:.2f},{b[2]:.2f},{b[3]:.2f}\n" for t, b in enumerate(boxes))
    (root / "trainlist01.txt").write_text("".join(train))
    (root / "testlist01.txt").write_text("".join(test))
    (root / "boxes.csv").write_text("".join(box_rows))
    spec_file.write_text(json.dumps(wanted, indent=2))
    return root


class Synthetic(UCF101):
    """The synthetic dataset: generated on first use, then read like UCF-101, with ground-truth boxes.

    Args:
        root: where the dataset lives (generated there if missing or made with another spec).
        split: ``train``, ``test`` or ``all``.
        generate_if_missing: write the dataset when ``root`` does not hold it.
        **spec: fields of :class:`SyntheticSpec` (seed, groups, clips_per_group, ...).
    """

    def __init__(self, root: str, split: str = "test", generate_if_missing: bool = True, **spec):
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        if generate_if_missing:
            generate(root, SyntheticSpec(**spec))
        super().__init__(root=root, split=split, fold=1)

    @property
    def boxes_path(self) -> Path:
        return self.root / "boxes.csv"
