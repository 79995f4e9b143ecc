"""Models of every shape, built from their zoo configs at small sizes and explained through the adapter, checked
against the methods' formulas on evidence from a full autograd graph read independently of the pipeline's
layouts: TSN/TSM (ntchw in, frames folded, verb/noun heads), HF video transformers (tokens, class token, token
order), SlowFast (two pathways) and X3D (a head that is not linear in the pooled features)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers.config import make_cfg
from helpers.oracles import assert_tubes_close, oracle_tubes
from pipeline.explain.explainer import classifier_weight
from pipeline.explain.methods import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from pipeline.models import ModelError
from pipeline.models.adapters import unwrap
from pipeline.runtime.builders import build_explainer

pytest.importorskip("transformers")
pytest.importorskip("pytorchvideo")

GRADIENT = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM}
HF_SMALL = [
    "+model.net.hidden_size=32",
    "+model.net.num_hidden_layers=2",
    "+model.net.num_attention_heads=2",
    "+model.net.intermediate_size=64",
    "model.net.num_labels=5",
    "model.input.clip_len=4",
    "model.input.size=[32,32]",
]
#: zoo entry -> (overrides for a small build, how to read the explained layer's raw output independently)
SMALL = {
    "tsn_r50": (["model.net.backbone=resnet18", "model.input.clip_len=4", "model.input.size=[64,64]"], "folded"),
    "tsm_r50": (["model.net.backbone=resnet18", "model.input.clip_len=4", "model.input.size=[64,64]"], "folded"),
    "videomae_b": ([*HF_SMALL, "+model.net.patch_size=8", "model.layer=videomae.encoder.layer.1"], "thw"),
    "timesformer_b": ([*HF_SMALL, "+model.net.patch_size=8", "model.layer=timesformer.encoder.layer.0"], "hwt"),
    "vivit_b": ([*HF_SMALL, "+model.net.tubelet_size=[2,8,8]", "model.layer=vivit.layers.0"], "thw"),
    "slowfast_r50": (
        ["model.input.clip_len=8", "model.input.size=[64,64]", "+model.net.stem_dim_outs=[16,2]"],
        "pathways",
    ),
    "x3d_s": (["model.input.clip_len=4", "model.input.size=[64,64]", "+model.net.head_dim_out=256"], "ncthw"),
    "x3d_m": (
        [
            "model.input.clip_len=4",
            "model.input.size=[64,64]",
            "+model.net.depth_factor=1.0",
            "+model.net.width_factor=1.0",
        ],
        "ncthw",
    ),
}
GRIDS = {"videomae_b": (2, 4, 4), "timesformer_b": (4, 4, 4), "vivit_b": (2, 4, 4)}
CAM_MODELS = {"tsn_r50", "tsm_r50", "slowfast_r50"}


def explainer_of(tmp_path, name, method="gradcam", *extra):
    cfg = make_cfg(tmp_path, [f"model={name}", f"method={method}", *SMALL[name][0], *extra])
    return cfg, build_explainer(cfg)


def raw_to_ncthw(raw: torch.Tensor, how: str, n: int, grid) -> torch.Tensor:
    """One raw layer tensor as (N, C, t, h, w), written out per shape (not with pipeline.explain.layouts)."""
    if how == "folded":  # (N*T, C, h, w): frames of a clip are consecutive
        return raw.reshape(n, raw.shape[0] // n, *raw.shape[1:]).permute(0, 2, 1, 3, 4)
    if how in ("thw", "hwt"):
        t, h, w = grid
        tokens = raw[:, raw.shape[1] - t * h * w :]  # a class token, if any, is in front
        if how == "hwt":
            return tokens.reshape(n, h, w, t, -1).permute(0, 4, 3, 1, 2)
        return tokens.reshape(n, t, h, w, -1).permute(0, 4, 1, 2, 3)
    return raw


def reference(adapter, layer, x, targets, how, grid):
    """Per pathway: activations (N, C, t, h, w) and gradients (N, k, C, t, h, w), float64, from a graph over the
    whole model with one autograd.grad per target."""
    store = {}

    def keep(_m, _i, out):
        store["out"] = list(out) if isinstance(out, list) else out  # SlowFast's head refills the list in place

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = adapter(x.clone().requires_grad_(True))
            out = store["out"]
            raws = list(out) if how == "pathways" else [out[0] if isinstance(out, tuple) else out]
            grads = [
                torch.autograd.grad(logits.gather(1, targets[:, j : j + 1]).sum(), raws, retain_graph=True)
                for j in range(targets.shape[1])
            ]
    finally:
        handle.remove()
    n = x.shape[0]
    acts = [raw_to_ncthw(r.detach(), how, n, grid).double().numpy() for r in raws]
    grads = [
        np.stack([raw_to_ncthw(g[p], how, n, grid).double().numpy() for g in grads], axis=1) for p in range(len(raws))
    ]
    return acts, grads, logits.detach()


def fused_oracle(method, acts, grads, targets, weights):
    """The pathways' tubes (oracle per pathway) repeated to the finest time axis and summed."""
    tubes = [oracle_tubes(method, a, g, targets, w) for a, g, w in zip(acts, grads, weights)]
    t = max(tube.shape[2] for tube in tubes)
    return sum(np.repeat(tube, t // tube.shape[2], axis=2) for tube in tubes)


@pytest.mark.parametrize("name", list(SMALL))
def test_zoo_entry_runs_every_method(tmp_path, name):
    cfg, explainer = explainer_of(tmp_path, name)
    how = SMALL[name][1]
    adapter, net = explainer.net, unwrap(explainer.net)
    if name in GRIDS:
        assert explainer.grid == GRIDS[name]
    clip = (3, cfg.model.input.clip_len, *cfg.model.input.size)
    torch.manual_seed(1)
    x = torch.randn(2, *clip)
    with torch.no_grad():
        targets = adapter(x).topk(2, dim=1).indices
    acts, grads, logits = reference(adapter, net.get_submodule(cfg.model.layer), x, targets, how, explainer.grid)
    for method, cls in GRADIENT.items():
        explainer.method = cls()
        out = explainer(x, lambda _: targets)
        torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
        assert_tubes_close(out.tubes, fused_oracle(method, acts, grads, targets, [None] * len(acts)))
    if name not in CAM_MODELS:
        with pytest.raises(ModelError, match="method=cam.*use a gradient method \\(gradcam"):
            explainer_of(tmp_path, name, "cam")
        return
    _, cam = explainer_of(tmp_path, name, "cam")
    weight = classifier_weight(cam.classifier, cam.classifier_name)[cam.head_rows].double().numpy()
    bounds = np.cumsum([0] + [a.shape[1] for a in acts])
    weights = [weight[:, bounds[i] : bounds[i + 1]] for i in range(len(acts))]
    out = cam(x, lambda _: targets)
    assert_tubes_close(out.tubes, fused_oracle("cam", acts, [None] * len(acts), targets, weights))
    # exact head: the tube's mean is the target logit minus the head's bias
    bias = cam.classifier.bias[cam.head_rows].double()[targets]
    torch.testing.assert_close(
        out.tubes.double().mean((2, 3, 4)), logits.double().gather(1, targets) - bias, rtol=1e-5, atol=1e-5
    )


def test_tsn_cam_is_the_per_frame_cam_of_the_noun_head(tmp_path):
    """TSN's head is linear per frame then averaged: the tube is each frame's CAM with the noun rows of new_fc."""
    cfg, cam = explainer_of(tmp_path, "tsn_r50", "cam", "model.output=noun")
    net = unwrap(cam.net)
    assert cam.head_rows == slice(97, 397) and cam.num_classes == 300
    torch.manual_seed(2)
    x = torch.randn(3, 3, 4, 64, 64)
    out = cam(x, lambda logits: logits.topk(2, dim=1).indices)
    frames = {}

    def keep(_m, _i, out):
        frames["maps"] = out.detach()

    handle = net.base_model.layer4.register_forward_hook(keep)
    with torch.no_grad():
        scores = net(x.transpose(1, 2))["noun"]
    handle.remove()
    maps = frames["maps"].double()  # (N*T, 512, h, w), one 2-D map per frame
    rows = net.new_fc.weight.double()[97:]
    for i in range(3):
        for j in range(2):
            target = int(out.targets[i, j])
            per_frame = torch.stack([torch.einsum("c,chw->hw", rows[target], maps[i * 4 + f]) for f in range(4)])
            torch.testing.assert_close(out.tubes[i, j].double(), per_frame, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, scores)


def test_tsm_shifts_a_share_of_channels_each_way():
    from pipeline.models.tsn import TemporalShift

    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2 * 3, 8, 1, 1)  # 2 clips of 3 frames, 8 channels
    out = TemporalShift(torch.nn.Identity(), num_segments=3, shift_div=4)(x).reshape(2, 3, 8)
    frames = x.reshape(2, 3, 8)
    assert torch.equal(out[:, :2, :2], frames[:, 1:, :2]) and (out[:, 2, :2] == 0).all()  # from the next frame
    assert torch.equal(out[:, 1:, 2:4], frames[:, :2, 2:4]) and (out[:, 0, 2:4] == 0).all()  # from the previous one
    assert torch.equal(out[:, :, 4:], frames[:, :, 4:])


def test_tsn_loads_the_epic_baseline_parameter_names(tmp_path):
    """A checkpoint saved the way the baselines' Lightning system saves it (model.base_model..., model.new_fc...,
    TSM's block.conv1.net...) loads; so does the inverse check: the names are those of the baseline."""
    from pipeline.models import load_checkpoint
    from pipeline.models.tsn import EpicTSN

    tsm = EpicTSN(num_segments=4, backbone="resnet18", shift=True)
    names = set(tsm.state_dict())
    assert {"base_model.conv1.weight", "base_model.layer1.0.conv1.net.weight", "new_fc.weight", "new_fc.bias"} <= names
    assert not any(n.startswith("base_model.fc.") for n in names)  # fc is the baseline's dropout
    assert tsm.new_fc.out_features == 97 + 300
    path = tmp_path / "epic.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tsm.state_dict().items()}, "epoch": 1}, path)
    other = EpicTSN(num_segments=4, backbone="resnet18", shift=True)
    load_checkpoint(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in tsm.state_dict().items())


def test_slowfast_fusion_is_the_cam_of_the_concatenated_head(tmp_path):
    """The fused tube equals the CAM of the pathways' maps concatenated along channels (slow steps repeated to
    the fast pathway's time axis) with the whole head: the head pools each pathway and concatenates."""
    cfg, cam = explainer_of(tmp_path, "slowfast_r50", "cam")
    net = unwrap(cam.net)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 64, 64)
    out = cam(x, lambda logits: logits.topk(2, dim=1).indices)
    maps = {}

    def keep(_m, _i, out):  # returns None: the output goes on unchanged (the head refills the list in place)
        maps["paths"] = [t.clone() for t in out]

    handle = net.blocks[4].register_forward_hook(keep)
    with torch.no_grad():
        net([x[:, :, ::4], x])
    handle.remove()
    slow, fast = maps["paths"]
    assert slow.shape[2] * 4 == fast.shape[2]
    joined = torch.cat([slow.repeat_interleave(4, dim=2), fast], dim=1).double()
    weight = net.blocks[6].proj.weight.double()
    expected = torch.einsum("nkc,ncthw->nkthw", weight[out.targets], joined)
    torch.testing.assert_close(out.tubes.double(), expected, rtol=1e-5, atol=1e-5)


def test_missing_extra_names_it(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pytorchvideo(name, *args, **kwargs):
        if name.startswith("pytorchvideo"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytorchvideo)
    monkeypatch.setattr("importlib.import_module", lambda name: no_pytorchvideo(name))
    with pytest.raises(
        ModelError, match=r"needs the 'pytorchvideo' extra: pip install 'saliency-tubes\[pytorchvideo\]'"
    ):
        from pipeline.models.zoo import x3d

        x3d(num_classes=5, clip_len=4, size=64)


# ---------------------------------------------------------------- models defined in the tests, configured only
CUSTOM = ["model=custom", "model.checkpoint=null", "model.input.size=[32,32]", "model.classes=null"]
FOLDED = [
    *CUSTOM,
    "model.net._target_=helpers.nets.FoldedNet",
    "model.input.layout=ntchw",
    "model.input.clip_len=4",
    "model.layout=folded",
    "model.layer=features",
    "model.classifier=head",
    "model.output=1",
]
HF_NESTED = [
    *CUSTOM,
    "model.net._target_=transformers.VideoMAEForVideoClassification",
    "+model.net.config._target_=transformers.VideoMAEConfig",
    "+model.net.config.num_labels=4",
    "+model.net.config.num_frames=4",
    "+model.net.config.image_size=32",
    "+model.net.config.patch_size=8",
    "+model.net.config.hidden_size=32",
    "+model.net.config.num_hidden_layers=2",
    "+model.net.config.num_attention_heads=2",
    "+model.net.config.intermediate_size=64",
    "model.input.layout=ntchw",
    "model.input.clip_len=4",
    "model.output=logits",
    "model.layout=tokens",
    "model.layer=videomae.encoder.layer.1",
]
TWO_PATH = [
    *CUSTOM,
    "model.net._target_=helpers.nets.TwoPathNet",
    "model.input.pathways=[2,1]",
    "model.input.clip_len=8",
    "model.layer=stage",
    "model.classifier=head",
]


def custom_explainer(tmp_path, overrides, method="gradcam"):
    cfg = make_cfg(tmp_path, [*overrides, f"method={method}"])
    return cfg, build_explainer(cfg)


@pytest.mark.parametrize(
    "overrides, how", [(FOLDED, "folded"), (HF_NESTED, "thw"), (TWO_PATH, "pathways")], ids=["folded", "hf", "paths"]
)
def test_a_model_of_each_shape_works_from_settings_alone(tmp_path, overrides, how):
    cfg, explainer = custom_explainer(tmp_path, overrides)
    adapter = explainer.net
    torch.manual_seed(4)
    x = torch.randn(2, 3, cfg.model.input.clip_len, 32, 32)
    with torch.no_grad():
        targets = adapter(x).topk(2, dim=1).indices
    layer = unwrap(adapter).get_submodule(cfg.model.layer)
    acts, grads, logits = reference(adapter, layer, x, targets, how, explainer.grid)
    for method, cls in GRADIENT.items():
        explainer.method = cls()
        assert_tubes_close(
            explainer(x, lambda _: targets).tubes, fused_oracle(method, acts, grads, targets, [None] * len(acts))
        )
    if how == "thw":
        return  # VideoMAE's head normalises the pooled tokens: cam is refused (tested with the zoo entry)
    _, cam = custom_explainer(tmp_path, overrides, "cam")
    weight = classifier_weight(cam.classifier, cam.classifier_name)[cam.head_rows].double().numpy()
    bounds = np.cumsum([0] + [a.shape[1] for a in acts])
    weights = [weight[:, bounds[i] : bounds[i + 1]] for i in range(len(acts))]
    assert_tubes_close(cam(x, lambda _: targets).tubes, fused_oracle("cam", acts, [None] * len(acts), targets, weights))
    if how == "folded":
        assert cam.head_rows == slice(3, 8)  # output 1: the second head's rows


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*FOLDED, "model.input.layout=ncthw"],
            r"FoldedNet fails on a clip given as model.input.layout=ncthw \(input \(1, 3, 4, 32, 32\)\)",
        ),
        (
            [*FOLDED, "model.output=verb"],
            r"model.output='verb': FoldedNet returned a tuple of 2 \(a tensor of shape \(1, 3\), a tensor of shape \(1, 5\)\)",
        ),
        ([*FOLDED, "model.output=null"], r"model.output: FoldedNet returned a tuple of 2"),
        (
            [*HF_NESTED, "model.output=null"],
            r"model.output: .* returned a ImageClassifierOutput with keys \['logits'\]",
        ),
        ([*HF_NESTED, "model.grid=[2,3,3]"], r"outputs 32 tokens, which do not fit the grid \(2, 3, 3\) = 18"),
        ([*HF_NESTED, "model.layout=ncthw"], r"outputs shape \(1, 32, 32\), not a 5-D map \(model.layout=ncthw\)"),
        ([*TWO_PATH, "model.input.pathways=null"], r"TwoPathNet fails on a clip given as model.input.layout=ncthw"),
    ],
    ids=["layout", "output-key", "output-missing", "hf-output", "grid", "layer-layout", "pathways"],
)
def test_a_wrong_interface_setting_fails_before_any_work(tmp_path, overrides, message):
    from pipeline.stages import extract

    with pytest.raises(ModelError, match=message):
        extract.validate(make_cfg(tmp_path, [*overrides, "method=gradcam"]))


def test_hf_zoo_entry_loads_a_local_folder(tmp_path):
    """``model.net.pretrained``: ``from_pretrained(folder, local_files_only=True)``; the weights are the folder's."""
    from pipeline.models.zoo import hf_video

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)  # HF_SMALL
    saved = hf_video("videomae", num_labels=5, num_frames=4, image_size=32, patch_size=8, **config)
    saved.save_pretrained(tmp_path / "mae")
    cfg, explainer = explainer_of(tmp_path, "videomae_b", "gradcam", f"model.net.pretrained={tmp_path / 'mae'}")
    loaded = unwrap(explainer.net)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("name", ["x3d_s", "tsn_r50"])
def test_gradient_methods_match_pytorch_grad_cam(tmp_path, name, monkeypatch):
    """pytorch-grad-cam on the adapted model (raw maps: its scaling off); TSN's folded frames are unfolded for it
    by a ``reshape_transform`` of its own, so both compute one 3-D map per clip."""
    import pytorch_grad_cam
    import pytorch_grad_cam.base_cam as grad_cam_base
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    monkeypatch.setattr(grad_cam_base, "scale_cam_image", lambda cam, target_size=None: cam)
    cfg, explainer = explainer_of(tmp_path, name)
    peer_net = copy.deepcopy(explainer.net).requires_grad_(True)  # the explainer froze its own parameters
    layer = unwrap(peer_net).get_submodule(cfg.model.layer)
    torch.manual_seed(5)
    x = torch.randn(1, 3, cfg.model.input.clip_len, *cfg.model.input.size)
    n, t = x.shape[0], x.shape[2]
    unfold = (lambda a: a.reshape(n, t, *a.shape[1:]).transpose(1, 2)) if name == "tsn_r50" else None
    for ours, theirs in ((GradCAM, pytorch_grad_cam.GradCAM), (LayerCAM, pytorch_grad_cam.LayerCAM)):
        explainer.method = ours()
        out = explainer(x, lambda logits: logits.argmax(1, keepdim=True))
        with theirs(model=peer_net, target_layers=[layer], reshape_transform=unfold) as peer:
            maps = peer(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in out.targets[:, 0]])
        assert_tubes_close(out.tubes, np.asarray(maps, dtype=np.float64)[:, None])
