"""Building a model from config and loading its weights from a local checkpoint."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from pipeline.errors import ModelError

PREFIXES = ("", "net.", "model.", "module.", "model.module.", "net.module.")


def load_checkpoint(net: nn.Module, path: str | Path) -> None:
    """Load a state_dict or Lightning checkpoint from a local file into ``net`` (weights only, strict).

    Lightning checkpoints keep weights under ``state_dict`` with the module's attribute as prefix (``net.``,
    ``model.``); DataParallel adds ``module.``. The prefix that makes the keys match the model is stripped. A
    checkpoint that does not fit is refused with its missing, unexpected and mismatched (shape) keys, read
    under the prefix that matches the most keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"model.checkpoint: {path} is not a loadable weights file ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.checkpoint: {path} holds a {type(state).__name__} that is not a state_dict of tensors")
    own = net.state_dict()
    candidates = [{k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} for prefix in PREFIXES]
    best = max(candidates, key=lambda c: len(set(c) & set(own)))
    mismatched = sorted(k for k in set(best) & set(own) if best[k].shape != own[k].shape)
    missing, unexpected = sorted(set(own) - set(best)), sorted(set(best) - set(own))
    if not (missing or unexpected or mismatched):
        net.load_state_dict(best, strict=True)
        return

    def listing(keys: list[str]) -> str:
        return f"{keys[:10]}{f' ... ({len(keys)} in all)' if len(keys) > 10 else ''}"

    shapes = [f"{k}: {tuple(best[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in mismatched]
    raise ModelError(
        f"model.checkpoint: {path} does not fit {type(net).__name__}: missing keys {listing(missing)}, "
        f"unexpected keys {listing(unexpected)}, mismatched keys {listing(shapes)}"
    )


#: held while a network is initialised: one built from a seed must draw every number of its weights itself, even
#: while another thread of the process (a Dask worker thread, an evaluate thread) initialises another network
_BUILDING = threading.Lock()


def build_model(cfg) -> nn.Module:
    """Instantiate ``cfg.net`` and load ``cfg.checkpoint`` if given; returns the model in eval mode.

    Without a checkpoint the weights are random but seeded (``cfg.init_seed``, default 0), so every worker,
    DDP rank and resumed run builds the same network.
    """
    with _BUILDING:  # torch's default generator is shared by a process's threads: initialisations take turns
        if cfg.get("checkpoint"):
            net = instantiate(cfg.net)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.get("init_seed") or 0))
                net = instantiate(cfg.net)
    if not isinstance(net, nn.Module):
        raise ModelError(f"model.net._target_ built a {type(net).__name__}, not a torch.nn.Module")
    if cfg.get("checkpoint"):
        load_checkpoint(net, cfg.checkpoint)
    return net.eval()
