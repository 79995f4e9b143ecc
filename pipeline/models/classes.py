"""A model's own class names, and how the dataset's labels map onto them.

A model scores its own classes, which need not be the dataset's: a Kinetics-400 network explained on
EPIC-Kitchens clips, or a 4-class model on a manifest that names 2 classes. Tube rows therefore name targets and
predictions with the *model's* classes; the dataset's label stays in the row, and accuracy and
``target.mode=label`` use the label mapped to a model class (identical names, or ``model.class_map``). A label
without a model class maps to -1 (accuracy and ``label`` targets are then not applicable to the clip).

Where the names come from (``model.classes``):

- a list of names, or a text file with one name per line;
- ``kinetics400``: the Kinetics-400 names torchvision ships with its video weights' metadata (no download);
- ``dataset``: the dataset's own classes (a model trained on the dataset it explains: the demo, your own);
- ``null``: an HF model's ``config.id2label`` where the model has one, else ``class 0`` ... ``class K-1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.errors import ConfigError, ModelError
from pipeline.models.adapters import unwrap

BUILT_IN = ("kinetics400",)
DATASET = "dataset"


def _built_in(name: str) -> list[str]:
    from torchvision.models.video import R3D_18_Weights

    return list(R3D_18_Weights.KINETICS400_V1.meta["categories"])


def _from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ModelError(f"model.classes: {path} is neither a file of class names nor one of {BUILT_IN}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _from_model(net: nn.Module) -> list[str] | None:
    """An HF model's ``config.id2label`` (index -> name), when it has one."""
    id2label = getattr(getattr(net, "config", None), "id2label", None)
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def model_class_names(setting, net: nn.Module, num_logits: int, dataset_classes: Sequence[str] = ()) -> list[str]:
    """The model's class names, one per logit, checked against ``num_logits`` (from one probe of the model).

    Args:
        setting: ``model.classes`` (None, ``dataset``, a built-in set's name, a file path or a list of names).
        net: the user's network (read for an HF ``config.id2label`` when ``setting`` is None).
        num_logits: the number of logits the model returns.
        dataset_classes: the dataset's class names (``model.classes=dataset``).

    Raises:
        ModelError: the names do not match the number of logits, or the file does not exist.
    """
    if setting is None:
        names = _from_model(net) or [f"class {i}" for i in range(num_logits)]
        where = "the model's config.id2label" if _from_model(net) else None
    elif setting == DATASET:
        names, where = list(dataset_classes), "model.classes=dataset (the dataset's classes)"
    elif isinstance(setting, str):
        names = _built_in(setting) if setting in BUILT_IN else _from_file(Path(setting))
        where = f"model.classes={setting}"
    elif isinstance(setting, Sequence):
        names, where = [str(name) for name in setting], "model.classes"
    else:
        raise ModelError(f"model.classes must be a list of names, a file or one of {BUILT_IN}, got {setting!r}")
    if len(names) != num_logits:
        hint = "set model.classes to the model's own class names (a list or a file, one per line)"
        if setting != DATASET and len(dataset_classes) == num_logits:
            hint = (
                f"the dataset has {num_logits} classes too: for a model trained on it set model.classes=dataset, "
                f"else {hint}"
            )
        raise ModelError(
            f"{where or 'model.classes'} has {len(names)} class names but {type(net).__name__} returns "
            f"{num_logits} logits; {hint}"
        )
    return names


def label_mapping(dataset_classes: Sequence[str], model_classes: Sequence[str], class_map=None) -> np.ndarray:
    """``(len(dataset_classes),)`` int64: the model class of each dataset class, -1 where it has none.

    A dataset class maps to the model class of the same name, or to what ``class_map`` (``model.class_map``:
    dataset class name -> model class name or index) says; ``class_map`` wins over identical names.

    Raises:
        ConfigError: ``class_map`` names a dataset class or a model class that does not exist.
    """
    lookup = {name: i for i, name in enumerate(model_classes)}
    mapping = np.array([lookup.get(name, -1) for name in dataset_classes], dtype=np.int64)
    position = {name: i for i, name in enumerate(dataset_classes)}
    for source, target in dict(class_map or {}).items():
        if source not in position:
            raise ConfigError(
                f"model.class_map: {source!r} is not a class of the dataset ({len(dataset_classes)} classes)"
            )
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(model_classes):
                raise ConfigError(
                    f"model.class_map: {source!r} -> {target} is out of the model's 0..{len(model_classes) - 1}"
                )
            mapping[position[source]] = target
        elif str(target) in lookup:
            mapping[position[source]] = lookup[str(target)]
        else:
            raise ConfigError(f"model.class_map: {source!r} -> {target!r} is not a class of the model")
    return mapping


def resolve(model_cfg, net: nn.Module, num_logits: int, dataset_classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The model's class names and the model class of each dataset class (-1: none), from ``model.classes`` and
    ``model.class_map``. ``net``: the user's network; ``num_logits``: what one probe of it returned."""
    names = model_class_names(model_cfg.get("classes"), net, num_logits, dataset_classes)
    class_map = model_cfg.get("class_map")
    if class_map is not None and not isinstance(class_map, Mapping):
        raise ConfigError(f"model.class_map must map dataset class names to model classes, got {class_map!r}")
    return names, label_mapping(dataset_classes, names, class_map)


def map_labels(labels, mapping: np.ndarray) -> np.ndarray:
    """Dataset labels (null / NaN = unknown) as model classes: ``(N,)`` int64, -1 = unknown or unmapped."""
    values = np.asarray(labels, dtype="float64")
    known = ~np.isnan(values)
    out = np.full(values.shape, -1, dtype=np.int64)
    index = values[known].astype(np.int64)
    inside = (index >= 0) & (index < len(mapping))
    out[np.flatnonzero(known)[inside]] = mapping[index[inside]]
    return out


def model_labels(model_cfg, explainer, dataset_classes: Sequence[str], labels) -> tuple[list[str], list]:
    """The model's class names, and ``labels`` (the dataset's, null = unknown) as model classes (None where
    unknown or unmapped), for the model of ``explainer`` (its probe gave the number of logits)."""
    names, mapping = resolve(model_cfg, unwrap(explainer.net), explainer.num_classes, dataset_classes)
    mapped = map_labels(labels, mapping)
    return names, [int(m) if m >= 0 else None for m in mapped]


def check_targets(model_cfg, target_mode: str, explainer, dataset_classes: Sequence[str] | None) -> None:
    """Checks, before any work, that the model's class names fit its logits and that ``target.mode=label`` has
    labels to explain (some dataset class maps to a model class). ``dataset_classes=None``: not known yet (no
    index), so only names that do not depend on the dataset are checked.

    Raises:
        ModelError: the names do not fit the logits.
        ConfigError: ``target.mode=label`` without any dataset class mapped to a model class.
    """
    if dataset_classes is None:
        if model_cfg.get("classes") != DATASET:
            model_class_names(model_cfg.get("classes"), unwrap(explainer.net), explainer.num_classes)
        return
    names, mapping = resolve(model_cfg, unwrap(explainer.net), explainer.num_classes, dataset_classes)
    if target_mode == "label" and not (mapping >= 0).any():
        shown = ", ".join(repr(n) for n in names[:3])
        raise ConfigError(
            "target.mode=label needs the clips' labels as classes of the model, but "
            + (
                f"none of the dataset's {len(dataset_classes)} classes"
                if len(dataset_classes)
                else "the dataset has no labels and"
            )
            + f" is a class of the model ({len(names)} classes: {shown}, ...); set model.class_map, or use "
            "target.mode=pred or topk"
        )
