"""The model zoo at test size: every conf/model/<name>.yaml built for small clips with random weights, and
torchvision's own transformer classes in reduced configurations (4 blocks, narrow), built once per session."""

from __future__ import annotations

import torch
import torchvision.models.video as tv
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.video.mvit import MSBlockConfig

from helpers.config import make_cfg
from pipeline.models import build_model

#: reduced transformers (torchvision's classes, 4 blocks, narrow), for the fast tests
SMALL = ["mvit_v1_small", "mvit_v2_small", "swin3d_small"]
CLIP = (8, 32, 32)
#: larger clips where the explained map would otherwise be 1 x 1 in space
CLIPS = {"mvit_v1_b": (8, 64, 64), "mvit_v2_s": (8, 64, 64), "swin3d_small": (8, 64, 64)}

_built: dict = {}


def small_transformer(name: str):
    """(model config, net) of a reduced MViT (v1- or v2-style blocks, pooling twice) or Swin3D."""
    if name == "swin3d_small":
        net = tv.SwinTransformer3d(
            patch_size=[2, 4, 4],
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=[2, 4, 4],
            stochastic_depth_prob=0.0,
            num_classes=5,
        )
        return OmegaConf.create(
            dict(layer="norm", classifier="head", layout="nthwc", fusion_layers=["features.4", "norm"])
        ), net
    blocks = [  # heads, channels in/out, pooling of queries / keys and values
        MSBlockConfig(1, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 4, 4]),
        MSBlockConfig(2, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 2, 2]),
        MSBlockConfig(2, 32, 32, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        MSBlockConfig(4, 32, 64, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
    ]
    v2 = name == "mvit_v2_small"
    net = tv.MViT(
        spatial_size=CLIP[1:],
        temporal_size=CLIP[0],
        block_setting=blocks,
        residual_pool=v2,
        residual_with_cls_embed=False,
        rel_pos_embed=v2,
        proj_after_attn=v2,
        num_classes=5,
    )
    return OmegaConf.create(
        dict(layer="blocks.2", classifier="head.1", layout="tokens", fusion_layers=["blocks.0", "blocks.2"])
    ), net


def zoo_model(name: str, clip=None):
    """(model config, net) of conf/model/<name>.yaml at a small clip size (or a reduced transformer), random
    weights, built once."""
    clip = clip or CLIPS.get(name, CLIP)
    if (name, clip) not in _built:
        torch.manual_seed(0)
        if name in SMALL:
            cfg, net = small_transformer(name)
        else:
            cfg = make_cfg(
                "/tmp",
                [
                    f"model={name}",
                    f"model.input.clip_len={clip[0]}",
                    f"model.input.size=[{clip[1]},{clip[2]}]",
                    "model.checkpoint=null",
                ],
            ).model
            net = build_model(cfg)
        if name == "s3d" and clip[1] < 224:
            # S3D's head averages a fixed 2x7x7 window, which needs 224 x 224 clips; small test clips get a
            # global average instead (still a 1x1x1 conv head; the real head is tested in the slow test below)
            net.avgpool = nn.AdaptiveAvgPool3d(1)
        for module in net.modules():  # BatchNorm statistics that are not the identity
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        _built[(name, clip)] = (cfg, net.eval())
    return _built[(name, clip)]
