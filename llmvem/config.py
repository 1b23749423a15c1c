"""Typed run configuration: one pydantic model per pipeline stage, loaded from YAML, saved beside every run.

A :class:`RunConfig` holds the sections ``data``, ``captions``, ``text``, ``backbone``, ``model``, ``train``,
``evaluate`` and ``multisubject`` (used by ``llmvem train-multi``) plus the run-wide ``seed`` and ``cache_dir``.
Every section forbids unknown keys, so a typo such as ``train.stage1.learning_rate`` fails with a message naming
the file, the key path and the keys that exist, instead of being silently ignored.

Examples
--------
>>> from llmvem.config import load_config, apply_overrides
>>> cfg = load_config("demo")                       # shipped config, by name
>>> cfg = apply_overrides(cfg, ["train.stage1.lr=3e-4", "model.lambda_align=0"])
>>> cfg.train.stage1.lr
0.0003
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmvem.config_models import ModelEntry, check_model_entries
from llmvem.config_yaml import parse_yaml
from llmvem.errors import ConfigError, quote, shorten

__all__ = [
    "AlignDataConfig",
    "BackboneConfig",
    "CaptionsConfig",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "MultiSubjectConfig",
    "RunConfig",
    "StageConfig",
    "TextConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "list_shipped_configs",
    "load_config",
    "save_config",
]


#: Folder of the configs shipped with the package (package data).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, numbers are finite
    (``.inf`` and ``.nan`` are refused, e.g. ``model.lambda_align=.inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: A seed: an integer in [0, 2**63) — what torch and NumPy accept — and never a boolean (``seed: true``).
Seed = Annotated[int, Field(ge=0, lt=2**63, strict=True)]


class DataConfig(_Section):
    """Which dataset to load and how to split it.

    ``spec`` is what :func:`llmvem.data.load_dataset` accepts: ``"virtual"`` (the built-in virtual brain), an
    Algonauts ``subjNN`` folder, a generic folder, or ``"v4:ROOT:SESSION"``. ``n_train``/``n_test``/
    ``image_size`` size the virtual brain only; ``loader_options`` are passed to the loader as keyword arguments.
    """

    spec: str = "virtual"
    n_train: int = Field(400, ge=2, description="virtual brain: training images")
    n_test: int = Field(100, ge=1, description="virtual brain: test images")
    image_size: int = Field(96, ge=8, description="virtual brain and virtual scenes: image side in pixels (a multiple of 24)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="fraction of training images held out for validation")
    seed: Seed = Field(0, description="seed of the dataset generator and of the validation split")
    loader_options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the loader")


class CaptionsConfig(_Section):
    """Which captioner describes the stimuli, and where captions are stored."""

    backend: Literal["dataset", "labels", "file", "transformers", "openai"] = "dataset"
    model: str | None = Field(None, description="VLM directory / hub id (transformers) or served model name (openai)")
    prompt: str | None = Field(None, description="instruction sent with each image; None = the captioner's default")
    max_new_tokens: int = Field(160, ge=1)
    base_urls: list[str] = Field(default_factory=list, description="OpenAI-compatible servers, e.g. http://localhost:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the key")
    max_in_flight: int = Field(8, ge=1, description="concurrent requests (openai backend)")
    captions_file: str | None = Field(None, description="CSV/JSON caption file (file backend)")
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    store: str | None = Field(None, description="SQLite caption store; None = <cache_dir>/captions.sqlite")
    shuffle: bool = Field(False, description="control: permute the caption sets across the images of each split")
    shuffle_seed: Seed = Field(0, description="seed of the caption permutation (captions.shuffle)")


class TextConfig(_Section):
    """Which text encoder embeds the captions: ``"minilm"`` (bundled), ``"st:<path>"`` or ``"clip:<path>"``."""

    encoder: str = "minilm"
    long_policy: Literal["sentence_mean", "truncate"] = "sentence_mean"
    batch_size: int = Field(64, ge=1)
    device: str = "auto"

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        if v != "minilm" and not v.startswith(("st:", "clip:")):
            raise ValueError(f"expected 'minilm', 'st:<path-or-id>' or 'clip:<path-or-id>', got {v!r}")
        return v


class BackboneConfig(_Section):
    """The image backbone: ``"efficientnet_lite0"``, ``"timm:<name>"`` or ``"hf:<path>"``.

    ``layers`` are the backbone layers whose (spatially pooled) features are concatenated into the readout input;
    ``"pooled"`` is the final embedding, which also feeds the alignment head. A layer may carry a spatial mode
    (:mod:`llmvem.embed.spatial`): ``"block5@grid4"`` (4×4 grid, flattened into the flat readout's input),
    ``"block5@proj512"`` (fixed random projection of the map), ``"block11@cls"`` (a ViT's class token).
    ``spatial_layers`` are maps for a spatial readout (``"block5@grid7"``, ``"block5@map"``), read beside the flat
    readout's ``layers``; empty means no spatial readout.

    ``init_core`` is a finished training folder (``llmvem train-multi``'s ``joint/`` folder, or a ``llmvem train``
    model folder) trained with stage 2: its fine-tuned backbone weights replace the pretrained ones before any
    feature is extracted (:mod:`llmvem.train.core_init`), so a new session is fitted on a core trained on other
    sessions. Its features are cached under their own identity.
    """

    name: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = Field(None, description="local weights file (safetensors or a plain state dict)")
    layers: list[str] = Field(default_factory=lambda: ["pooled"], min_length=1)
    image_size: int | None = Field(None, ge=8, description="input side; None = the backbone's default")
    feature_dtype: Literal["float16", "float32"] = "float32"
    batch_size: int = Field(32, ge=1, description="batch size of feature extraction")
    device: str = "auto"
    spatial_layers: list[str] = Field(default_factory=list, description="maps for a spatial readout, e.g. "
                                      "['block8@grid7', 'block12@map'] (layer@grid<G> or layer@map)")
    init_core: str | None = Field(None, description="training folder whose fine-tuned backbone weights are loaded "
                                  "(a train-multi joint/ folder); None = the pretrained backbone")

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"layers must be unique, got {v}")
        return v

    @field_validator("spatial_layers")
    @classmethod
    def _spatial_maps(cls, v: list[str]) -> list[str]:
        from llmvem.embed.spatial import parse_layer_spec

        flat = [name for name in v if not parse_layer_spec(name).spatial]
        if flat or len(set(v)) != len(v):
            raise ValueError(f"expected unique '<layer>@grid<G>' or '<layer>@map' specs, got {v}")
        return v


class ModelConfig(_Section):
    """The LLM-VEM network: voxel readout and alignment head.

    ``pca_components`` = None uses ``min(2048, n_train, n_voxels)``. ``voxel_loss`` = ``"pca"`` computes the MSE
    between predicted and true PCA scores instead of voxel responses. ``align_dim`` = None projects to the text
    embedding size. ``lambda_align`` = 0 trains the plain encoding model (the alignment head then has no effect,
    unless ``readout_aligned``). ``spatial_readout`` reads the maps of ``backbone.spatial_layers`` (factorized
    masks or Gaussian positions, :mod:`llmvem.model.spatial`); ``spatial_mode`` = ``"residual"`` adds it to the
    flat readout, ``"alone"`` predicts with it only. ``"none"`` is the network without spatial readout. ``readout_aligned`` feeds the flat
    readout the alignment head's embedding next to the features (or core output): λ then shapes the predictions
    already in stage 1 without a core; at λ = 0 the head is trained by the voxel loss alone (the same-architecture
    baseline; set ``align_dim`` to the caption-embedding size so that the λ = 0 head has the same size).
    """

    readout: Literal["pca", "linear"] = "pca"
    pca_components: int | None = Field(None, ge=1)
    voxel_loss: Literal["voxel", "pca"] = "voxel"
    readout_l2: float = Field(0.0, ge=0.0, description="L2 penalty on the readout weights (added to the loss)")
    align_dim: int | None = Field(None, ge=1)
    projection: Literal["linear", "mlp"] = "linear"
    lambda_align: float = Field(0.1, ge=0.0)
    align_target: Literal["captions", "attributes", "classes"] = Field("captions", description="what the head is "
                                                                       "aligned to (llmvem.embed.targets)")
    temperature_init: float = Field(0.07, gt=0.0)
    learn_temperature: bool = True
    feature_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    standardize_features: bool = Field(True, description="z-score readout inputs with training-set statistics")
    core: Literal["linear", "mlp"] | None = Field(None, description="shared core between the standardised "
                                                  "features and the readouts; None = read the features directly")
    core_dim: int = Field(256, ge=1, description="units of the core (with model.core)")
    core_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the core output")
    readout_aligned: bool = Field(False, description="the flat readout also reads the alignment head's embedding "
                                  "(features or core output ⊕ embedding); needs a flat readout")
    spatial_readout: Literal["none", "factorized", "gaussian"] = Field(
        "none", description="spatial readout on the maps of backbone.spatial_layers")
    spatial_mode: Literal["residual", "alone"] = Field(
        "residual", description="flat (PCA) readout + spatial residual, or the spatial readout alone")
    spatial_l1: float = Field(0.0, ge=0.0, description="sparsity penalty of the spatial readout")
    spatial_smoothness: float = Field(0.0, ge=0.0, description="smoothness penalty of factorized masks")
    spatial_init: Literal["ridge", "random"] = Field(
        "ridge", description="factorized readouts start at the rank-1 part of a ridge fit on the training maps, "
                             "or at small random weights")
    readout_init: Literal["ridge", "random", "auto"] = Field(
        "random", description="the PCA readout (and a linear core) start at the ridge solution of the training "
                              "responses' PCA scores (llmvem.model.start), or at random weights; auto: both "
                              "are candidates (the ridge start is validated, stage 1 trains from the random "
                              "one, validation keeps the better)")

    @model_validator(mode="after")
    def _aligned_needs_flat_readout(self) -> ModelConfig:
        if self.readout_aligned and self.spatial_readout != "none" and self.spatial_mode == "alone":
            raise ValueError("readout_aligned needs the flat readout that reads the embedding: set "
                             "model.spatial_mode=residual (spatial_mode=alone has no flat readout)")
        return self


class StageConfig(_Section):
    """One training stage. ``batch_size`` is the global batch (split across processes under torchrun)."""

    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(1e-4, ge=0.0)
    unfreeze_last_n: int = Field(0, ge=0, description="backbone blocks trained (stage 2); 0 = heads only")
    backbone_lr: float | None = Field(None, gt=0.0, description="lr of unfrozen backbone blocks; None = lr / 10")
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    step_every: int = Field(10, ge=1, description="step schedule: epochs between lr drops")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, ge=1)
    early_stopping_patience: int | None = Field(5, ge=1, description="epochs without val improvement; None = off")
    augment: bool = Field(False, description="random flips and shifts of the images (stage 2)")


def _stage2_default() -> StageConfig:
    return StageConfig(epochs=0, lr=1e-4, batch_size=32, unfreeze_last_n=2)


class TrainConfig(_Section):
    """Two-stage training: stage 1 trains the heads on cached features, stage 2 fine-tunes the last blocks."""

    stage1: StageConfig = Field(default_factory=StageConfig)
    stage2: StageConfig = Field(default_factory=_stage2_default)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    channels_last: bool = False
    num_workers: int = Field(0, ge=0, description="data-loading workers of the pipeline; the trainer itself "
                             "keeps everything in memory")
    deterministic: bool = True
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    trunk_cache_mib: int = Field(512, ge=0, description="memory for the frozen backbone trunk's outputs, reused "
                                 "by stage 2, predictions and text-to-brain (backbones that can split; "
                                 "llmvem.embed.trunk_cache); 0 = off")
    selection: Literal["global", "per_key"] = Field(
        "global", description="model selection on validation mean r: one best epoch for the mean over data keys, "
        "or each key's own best epoch (training stops when no key improved for early_stopping_patience epochs)")
    epoch: Literal["voxel_steps", "all_batches"] = Field("voxel_steps", description="an epoch: the brain keys' "
                                                         "batches, caption streams joining them (llmvem.train.engine)")
    clip_per_loss: bool = Field(True, description="grad_clip on the voxel and the contrastive gradient separately")


class EvaluateConfig(_Section):
    """Evaluation and baselines."""

    ridge_alphas: list[float] = Field(default_factory=lambda: [10.0**k for k in range(-2, 8)], min_length=1,
                                      description="penalties on z-scored features (llmvem.model.ridge.DEFAULT_ALPHAS)")
    ridge_folds: int = Field(5, ge=2)
    ridge_device: str = "auto"
    bootstrap: int = Field(1000, ge=0, description="paired bootstrap resamples; 0 = off")
    compare_lambdas: list[float] = Field(default_factory=list, description="also train at these lambda_align values")
    baselines: list[Literal["ridge", "lambda0"]] = Field(default_factory=lambda: ["ridge", "lambda0"])
    text_to_brain: bool = Field(True, description="fit text-to-brain readouts of the λ > 0 model and add the "
                                "text-to-brain and voxel-description report sections (llmvem.explain)")
    per_voxel_choice: bool = Field(
        False, description="with model.spatial_readout set: also train the λ = 0 model without the spatial readout "
        "(llmvem_lambda0_pooled) and report a model that takes, per voxel, the pooled or the spatial λ = 0 "
        "model's prediction, whichever has the higher validation r (per_voxel_choice; its val r is in-sample)")
    variance_partition: bool = Field(False, description="image features and caption embeddings as two bands: "
                                     "unique and shared test R² per voxel and ROI (llmvem.evaluate.partition)")
    partition_layers: list[str] | None = Field(None, description="image band of the variance partition "
                                               "(default backbone.layers)")
    models: list[ModelEntry] = Field(default_factory=list, description="the experiment's models (llmvem."
                                     "config_models); empty = ridge, λ = 0 and each λ > 0")

    @field_validator("models")
    @classmethod
    def _models_refer_back(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        return check_model_entries(v)


class MultiSubjectConfig(_Section):
    """Several subjects trained jointly (``llmvem train-multi``): a shared core between the frozen-backbone
    features and one voxel readout per subject.

    ``core`` is a linear bottleneck (or a Linear → GELU → Linear MLP) of ``core_dim`` units over the concatenated,
    standardised layer features, shared by all subjects; the alignment head reads its output. ``"none"``: no
    core; the subjects then share only the backbone blocks stage 2 fine-tunes (the shared visual core of the
    spatial V4 models), and each has its own flat and spatial readouts. With
    ``loss_weighting = "variance"`` each subject's voxel MSE is divided by the mean variance of its training
    responses, so subjects recorded in different units (spike counts, BOLD) pull on the core equally.
    """

    core: Literal["linear", "mlp", "none"] = "linear"
    core_dim: int = Field(256, ge=1, description="units of the shared core")
    core_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the core output")
    loss_weighting: Literal["variance", "none"] = "variance"
    split: Literal["image_key", "dataset"] = Field(
        "image_key", description="re-split every subject by image key with one test share (an image several "
        "subjects saw lands on the same side for all), or keep each dataset's own split (refused when a test "
        "image of one subject is a training or validation image of another)")
    selection: Literal["per_subject", "mean"] = Field(
        "per_subject", description="model selection on the validation split: each subject's own best epoch "
        "(training stops when no subject improved for early_stopping_patience epochs), or the best epoch of the "
        "mean over subjects")


class AlignDataConfig(_Section):
    """Captioned images without brain data (the alignment stream): they add only the contrastive loss.

    ``spec`` is a folder with ``images/`` and a caption file (``captions_file``, default the folder's
    ``captions.csv``/``.json``/``.jsonl``/``.tsv``) as :func:`llmvem.captions.existing.read_caption_file` reads
    it, or ``"virtual-scenes:n=2000,seed=7"``: extra virtual-brain scenes with their exact descriptions (at
    ``data.image_size``). None = no stream. The stream's batches join the brain batches' steps in both stages
    (``ratio`` per step, ``train.epoch``); its contrastive loss is multiplied by ``weight`` (and ``model.lambda_align``), so ``weight`` = 0 or
    ``lambda_align`` = 0 leaves training exactly as without it. ``llmvem train``/``demo``/``sweep`` and
    ``LLMVEMEncoder.fit`` load it (cached) for every model with ``lambda_align > 0``; the run folder records it
    (``align_stream`` in ``metrics.json`` and ``training.json``).
    """

    spec: str | None = None
    captions_file: str | None = Field(None, description="caption file of a folder spec (default: found in it)")
    weight: float = Field(1.0, ge=0.0, description="factor on the stream's contrastive loss")
    batch_size: int | None = Field(None, ge=2, description="batch of the stream; None = the stage's batch size")
    max_images: int | None = Field(None, ge=2, description="use at most this many images (the first ones)")
    ratio: float | None = Field(None, gt=0.0, description="stream batches per voxel step; None = the stream once per epoch")


class RunConfig(_Section):
    """Everything that defines a run. Saved as ``config.yaml`` in every run folder."""

    data: DataConfig = Field(default_factory=DataConfig)
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    multisubject: MultiSubjectConfig = Field(default_factory=MultiSubjectConfig)
    align_data: AlignDataConfig = Field(default_factory=AlignDataConfig)
    seed: Seed = 0
    cache_dir: str = "~/.cache/llmvem"

    @model_validator(mode="after")
    def _spatial_needs_maps(self) -> RunConfig:
        if self.model.spatial_readout != "none" and not self.backbone.spatial_layers:
            raise ValueError(f"model.spatial_readout = {self.model.spatial_readout!r} needs maps: set "
                             "backbone.spatial_layers, e.g. ['block5@grid7']")
        if self.evaluate.per_voxel_choice and self.model.spatial_readout == "none":
            raise ValueError("evaluate.per_voxel_choice = true chooses between the pooled and the spatial readout "
                             "per voxel: set model.spatial_readout (factorized or gaussian) and "
                             "backbone.spatial_layers, or turn it off")
        return self


# ----------------------------------------------------------------------------------------------- helpers
def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _expected_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys that exist at the parent of ``loc`` (for 'unknown key' messages)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return sorted(getattr(cls, "model_fields", {}))


def _validation_message(exc: ValidationError, source: str) -> str:
    """One line per pydantic error, joined with "; "; every quoted value bounded (:func:`llmvem.errors.quote`)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = shorten(_format_loc(loc))
        if err.get("type") == "extra_forbidden":
            known = _expected_keys(RunConfig, loc)
            hint = f"; expected one of: {', '.join(known)}" if known else ""
            lines.append(f"{source}: {key}: unknown key{hint}")
        else:
            got = err.get("input")
            got_txt = f" (got {quote(got)})" if not isinstance(got, dict) else ""
            lines.append(f"{source}: {key}: {shorten(str(err.get('msg')))}{got_txt}")
        if len(lines) == 3 and len(exc.errors()) > 3:
            lines.append(f"and {len(exc.errors()) - 3} more errors")
            break
    return "; ".join(lines)


def _validate(data: Any, source: str) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...), got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from exc


def list_shipped_configs() -> list[str]:
    """Names of the configs shipped in ``llmvem/configs`` (load them with :func:`load_config`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def _resolve(path_or_name: str | Path) -> tuple[str, str]:
    """(source label, YAML text) of a config file path or a shipped config name."""
    path = Path(path_or_name)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
        try:
            return str(path), data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save "
                              "the config as UTF-8") from exc
    name = str(path_or_name)
    if path.suffix == "" and "/" not in name and name in list_shipped_configs():
        return f"llmvem/configs/{name}.yaml", (SHIPPED_CONFIGS / f"{name}.yaml").read_text(encoding="utf-8")
    raise ConfigError(
        f"{path_or_name}: no such config file, and not a shipped config name "
        f"(shipped: {', '.join(list_shipped_configs())})")


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a YAML run config.

    Parameters
    ----------
    path : str or Path
        A YAML file, or the name of a shipped config (``"demo"``, ``"algonauts_eva02"``).

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        Unreadable file, invalid YAML, unknown key or wrong type; the message names the file and the key path
        (``train.stage1.lr``) and what was expected.
    """
    source, text = _resolve(path)
    return _validate(parse_yaml(text, source), source)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (every key, defaults included) so the run can be reproduced from the file."""
    from llmvem.utils import atomic_write

    with atomic_write(path) as fh:
        yaml.safe_dump(config.model_dump(mode="json"), fh, sort_keys=False, default_flow_style=False)


def _parse_value(text: str, item: str) -> Any:
    """The YAML value of an override; text that is not valid YAML stays text, but a YAML bomb or a duplicate key
    is an error."""
    try:
        return parse_yaml(text, f"--set {quote(item)}")
    except ConfigError as exc:
        if "invalid YAML" in str(exc) and "duplicate key" not in str(exc):
            return text
        raise


def apply_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of ``config`` with ``key.path=value`` overrides applied and validated.

    Values are parsed as YAML (``1e-3``, ``true``, ``[a, b]``, ``null``); a value that parses to the wrong type
    for a text field is kept as text (so ``backbone.name=123`` is the string ``"123"``).

    Raises
    ------
    ConfigError
        Malformed override, unknown key (naming the keys that exist) or invalid value.
    """
    data = config.model_dump(mode="python")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {quote(item)}: expected KEY=VALUE, e.g. train.stage1.lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node: Any = data
        cls: Any = RunConfig  # the pydantic model at this depth, or None inside a free-form dict field
        for depth, part in enumerate(parts[:-1]):
            if cls is None and isinstance(node, dict):  # e.g. data.loader_options.hemispheres=[lh]
                node = node.setdefault(part, {})
                continue
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                where = ".".join(parts[: depth + 1])
                keys = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"--set {quote(item)}: {shorten(where)}: unknown section; expected one of: {', '.join(keys)}")
            field = cls.model_fields[part]
            ann = field.annotation
            cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            node = node[part]
        leaf = parts[-1]
        if leaf not in node and cls is not None:
            raise ConfigError(f"--set {quote(item)}: {shorten(key)}: unknown key; expected one of: {', '.join(sorted(node))}")
        node[leaf] = parsed = _parse_value(raw, item)
        try:
            RunConfig.model_validate(data)
        except ValidationError as first:
            node[leaf] = raw  # e.g. a numeric-looking name for a text field
            try:
                RunConfig.model_validate(data)
            except ValidationError as exc:
                node[leaf] = parsed  # report the parsed value's error unless the value was text anyway
                err = exc if isinstance(parsed, str) else first
                raise ConfigError(_validation_message(err, f"--set {quote(item)}")) from err
    return _validate(data, "overrides")


def config_diff(a: RunConfig | dict, b: RunConfig | dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two configs, as ``(key.path, value_in_a, value_in_b)``.

    ``ignore`` lists key paths or section prefixes (``"evaluate"``, ``"train.num_workers"``) to skip.
    """
    da = a.model_dump(mode="json") if isinstance(a, BaseModel) else a
    db = b.model_dump(mode="json") if isinstance(b, BaseModel) else b
    out: list[tuple[str, Any, Any]] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if any(prefix == p or prefix.startswith(p + ".") for p in ignore):
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif x != y:
            out.append((prefix, x, y))

    walk(da, db, "")
    return out
