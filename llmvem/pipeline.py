"""The whole LLM-VEM experiment of one configuration: ridge, LLM-VEM at λ = 0 and at each λ > 0 (and, with
``evaluate.per_voxel_choice`` and a spatial readout, the pooled λ = 0 model and a per-voxel choice between them).

:func:`run_experiment` prepares the inputs (:func:`llmvem.inputs.prepare_inputs`, every stage cached), builds
the estimators (:func:`experiment_models`) and hands them to the one experiment runner
(:func:`llmvem.experiment.run_models`), which evaluates them on the test split with paired statistics and writes
the run folder: ``config.yaml``, ``versions.json``, ``metrics.json``, ``voxel_metrics.npz``,
``lambda_curve.json``, ``gallery.json`` + ``gallery/``, ``models/<name>/`` and ``report/index.html``.

``prepare_inputs`` and ``PreparedInputs`` are re-exported from :mod:`llmvem.inputs` for older code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmvem.config import RunConfig
from llmvem.config_models import ModelEntry
from llmvem.embed.trunk_cache import TRUNK_CACHE_FILE, shared_trunk_cache
from llmvem.estimators import LLMVEMEncoder, RidgeEncoder, model_name
from llmvem.experiment import EXPERIMENT_OUTPUTS, ModelSpec, default_pairs, run_models
from llmvem.inputs import PreparedInputs, cache_root, prepare_inputs

__all__ = ["EXPERIMENT_OUTPUTS", "PER_VOXEL_CHOICE", "POOLED_LAMBDA0", "PreparedInputs", "entry_specs",
           "experiment_lambdas", "experiment_layers", "experiment_models", "extraction_config", "llmvem_spec",
           "load_model_streams", "prepare_inputs", "ridge_spec", "run_experiment"]

log = logging.getLogger(__name__)

#: Model names ``evaluate.per_voxel_choice`` adds: the λ = 0 model without spatial readout, and the choice.
POOLED_LAMBDA0 = "llmvem_lambda0_pooled"
PER_VOXEL_CHOICE = "per_voxel_choice"


def experiment_lambdas(config: RunConfig) -> list[float]:
    """The λ values an experiment trains: ``model.lambda_align`` and ``evaluate.compare_lambdas``, plus 0 when
    ``"lambda0"`` is in ``evaluate.baselines``; sorted, unique."""
    lambdas = [config.model.lambda_align, *config.evaluate.compare_lambdas]
    if "lambda0" in config.evaluate.baselines:
        lambdas = [0.0, *lambdas]
    return sorted({float(x) for x in lambdas})


def llmvem_spec(config: RunConfig, lam: float, label: str | None = None, show_progress: bool = False,
                **kwargs: Any) -> ModelSpec:
    """LLM-VEM trained with ``config`` at ``lambda_align = lam`` (other ``ModelSpec`` fields in ``kwargs``)."""
    cfg = config.model_copy(deep=True)
    cfg.model.lambda_align = float(lam)
    label = label or f"LLM-VEM λ={lam:g}" + (" (no alignment)" if lam == 0 else "")
    return ModelSpec(LLMVEMEncoder(cfg, show_progress=show_progress), label, kind=kwargs.pop("kind", "llmvem"),
                     lam=float(lam), **kwargs)


def ridge_spec(config: RunConfig, layers: Sequence[str] | None = None) -> ModelSpec:
    """The ridge baseline on frozen features (train + val), as ``config.evaluate`` describes it."""
    return ModelSpec(RidgeEncoder.from_config(config, layers), "Ridge (frozen features)", kind="ridge")


def pooled_config(config: RunConfig) -> RunConfig:
    """``config`` without its spatial readout (``model.spatial_readout = "none"``, no ``backbone.spatial_layers``):
    the pooled model a per-voxel choice compares the spatial one with."""
    cfg = config.model_copy(deep=True)
    cfg.evaluate.per_voxel_choice = False
    cfg.model.spatial_readout = "none"
    cfg.backbone.spatial_layers = []
    return cfg


def per_voxel_choice_specs(config: RunConfig, trained: Sequence[str] = (), show_progress: bool = False
                           ) -> dict[str, ModelSpec]:
    """The models ``evaluate.per_voxel_choice`` adds to an experiment with a spatial readout.

    ``POOLED_LAMBDA0``: the λ = 0 model of :func:`pooled_config` (not a point of the λ curve), and
    ``PER_VOXEL_CHOICE``: a :class:`~llmvem.estimators.PerVoxelChoice` between it (``"pooled"``) and the λ = 0
    model with the spatial readout (``"spatial"``), each voxel taking the one with the higher validation r. The
    choice reuses the fitted pooled model and, when ``model_name(0)`` is among ``trained`` (the experiment's
    other models), the fitted spatial one; otherwise it trains its spatial candidate itself.

    Raises
    ------
    ConfigError
        ``evaluate.per_voxel_choice`` is set but ``model.spatial_readout`` is ``"none"``.
    """
    from llmvem.errors import ConfigError
    from llmvem.estimators import PerVoxelChoice

    if config.model.spatial_readout == "none":
        raise ConfigError("evaluate.per_voxel_choice = true chooses between the pooled and the spatial readout "
                          "per voxel: set model.spatial_readout (factorized or gaussian) and "
                          "backbone.spatial_layers, or turn it off")
    pooled = llmvem_spec(pooled_config(config), 0.0, label="LLM-VEM λ=0, pooled readout (no spatial readout)",
                         show_progress=show_progress)
    pooled.lam = None  # the λ curve is the spatial models'
    spatial = llmvem_spec(config, 0.0, show_progress=show_progress).estimator
    reuses = {"pooled": POOLED_LAMBDA0, **({"spatial": model_name(0.0)} if model_name(0.0) in trained else {})}
    choice = ModelSpec(PerVoxelChoice({"pooled": pooled.estimator, "spatial": spatial}),
                       "per-voxel choice (pooled vs spatial, on validation r)", kind="per_voxel_choice",
                       reuses=reuses)
    return {POOLED_LAMBDA0: pooled, PER_VOXEL_CHOICE: choice}


def entry_config(config: RunConfig, entry: ModelEntry) -> RunConfig:
    """The run config of an ``evaluate.models`` LLM-VEM entry: ``config`` with the entry's ``set`` overrides and
    ``lambda_align``, its own ``evaluate.models`` emptied.

    Raises
    ------
    ConfigError
        An override is invalid; the message names the entry.
    """
    import yaml

    from llmvem.config import apply_overrides
    from llmvem.errors import ConfigError

    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in entry.set.items()]
    try:
        cfg = apply_overrides(config, items)
    except ConfigError as exc:
        raise ConfigError(f"evaluate.models ({entry.name}).set: {exc}") from exc
    cfg.evaluate.models = []
    if entry.lambda_align is not None:
        cfg.model.lambda_align = float(entry.lambda_align)
    return cfg


def entry_specs(config: RunConfig, show_progress: bool = False) -> dict[str, ModelSpec]:
    """The models ``evaluate.models`` declares (see :mod:`llmvem.config_models`), as the runner's specs."""
    from llmvem.composite import Blend, ChooseOnValidation, SeedEnsemble
    from llmvem.estimators import BandedRidgeEncoder

    models: dict[str, ModelSpec] = {}
    for e in config.evaluate.models:
        label = e.label or e.name
        if e.kind == "ridge":
            if e.layer_sets:
                est: Any = ChooseOnValidation({"+".join(ls): RidgeEncoder.from_config(config, ls)
                                               for ls in e.layer_sets}, refit_splits=tuple(e.fit_splits))
            else:
                est = RidgeEncoder.from_config(config, e.layers)
                est.set_params(fit_splits=tuple(e.fit_splits))
            models[e.name] = ModelSpec(est, label, kind="ridge")
        elif e.kind == "banded_ridge":
            est = BandedRidgeEncoder.from_config(config, e.bands, n_iter=e.n_iter, fit_splits=tuple(e.fit_splits))
            models[e.name] = ModelSpec(est, label, kind="banded_ridge")
        elif e.kind == "llmvem":
            cfg = entry_config(config, e)
            spec = llmvem_spec(cfg, cfg.model.lambda_align, label, show_progress)
            if e.seeds > 1:
                spec.estimator = SeedEnsemble(spec.estimator, n_seeds=e.seeds)
            if e.set:  # not a point of the λ curve of the run's own configuration
                spec.lam = None
            models[e.name] = spec
        else:
            models[e.name] = ModelSpec(Blend({m: models[m].estimator for m in e.members}, weight_step=e.weight_step,
                                             seed=config.seed), label, kind="blend",
                                       reuses={m: m for m in e.members})
    return models


def entry_pairs(config: RunConfig) -> list[tuple[str, str]]:
    """The comparisons of ``evaluate.models``: (that model, this model) for every name in ``compare_to``."""
    return [(other, e.name) for e in config.evaluate.models for other in e.compare_to]


def experiment_layers(config: RunConfig) -> list[str]:
    """Every layer the experiment's models read (``backbone.layers``, the maps of a spatial readout, and the
    layers, layer sets, bands and ``set`` overrides of ``evaluate.models``): what feature extraction provides."""
    layers = list(config.backbone.layers)
    if config.model.spatial_readout != "none":
        layers += config.backbone.spatial_layers
    for e in config.evaluate.models:
        layers += [*(e.layers or []), *(k for ls in e.layer_sets for k in ls), *(k for b in e.bands for k in b)]
        if e.kind == "llmvem":
            cfg = entry_config(config, e)
            layers += cfg.backbone.layers
            if cfg.model.spatial_readout != "none":
                layers += cfg.backbone.spatial_layers
    return list(dict.fromkeys(layers))


def extraction_config(config: RunConfig) -> RunConfig:
    """``config`` with ``backbone.layers`` = :func:`experiment_layers`, so one pass of feature extraction (and
    the cache) serves every model of the experiment; each model still reads only its own layers."""
    layers = experiment_layers(config)
    if layers == list(config.backbone.layers):
        return config
    cfg = config.model_copy(deep=True)
    cfg.backbone.layers = layers
    return cfg


def experiment_models(config: RunConfig, lambdas: Sequence[float] | None = None, show_progress: bool = False
                      ) -> dict[str, ModelSpec]:
    """The models of :func:`run_experiment`: those of ``evaluate.models`` when it is set (:func:`entry_specs`);
    else ``ridge`` (when in ``evaluate.baselines``), then ``llmvem_lambda<λ>`` for each λ (default
    :func:`experiment_lambdas`), then, with ``evaluate.per_voxel_choice``, the models of
    :func:`per_voxel_choice_specs`."""
    if config.evaluate.models:
        return entry_specs(config, show_progress)
    models: dict[str, ModelSpec] = {}
    if "ridge" in config.evaluate.baselines:
        models["ridge"] = ridge_spec(config)
    for lam in sorted({float(x) for x in (experiment_lambdas(config) if lambdas is None else lambdas)}):
        models[model_name(lam)] = llmvem_spec(config, lam, show_progress=show_progress)
    if config.evaluate.per_voxel_choice:
        models.update(per_voxel_choice_specs(config, list(models), show_progress))
    return models


def experiment_pairs(names: Sequence[str], config: RunConfig | None = None) -> list[tuple[str, str]]:
    """The bootstrap comparisons of :func:`run_experiment`: with ``evaluate.models``, its ``compare_to`` pairs
    (:func:`entry_pairs`); else :func:`~llmvem.experiment.default_pairs`, plus the per-voxel choice against the
    pooled λ = 0 model when both are among ``names``."""
    if config is not None and config.evaluate.models:
        return entry_pairs(config)
    pairs = default_pairs(names)
    if POOLED_LAMBDA0 in names and PER_VOXEL_CHOICE in names:
        pairs.append((POOLED_LAMBDA0, PER_VOXEL_CHOICE))
    return pairs


def load_model_streams(models: Mapping[str, ModelSpec], inputs: PreparedInputs, show_progress: bool = True,
                       say: Callable[[str], None] | None = None) -> None:
    """Load the alignment stream (``align_data``) of every model that uses it into ``inputs`` before any model is
    fitted, so a bad ``align_data.spec`` fails first and the models share one load; ``say`` gets one line per
    stream naming its spec, size, weight and models, and the λ = 0 models that ignore it."""
    from llmvem.train.stream import stream_for_inputs

    say = say or log.info
    t = time.perf_counter()
    users: dict[int, tuple[Any, list[str]]] = {}
    ignoring: list[str] = []
    for name, spec in models.items():
        cfg = getattr(spec.estimator, "config", None)
        if cfg is None or cfg.align_data.spec is None:
            continue
        stream = stream_for_inputs(cfg, spec.inputs or inputs, show_progress)
        if stream is None:
            ignoring.append(name)
        else:
            users.setdefault(id(stream), (stream, []))[1].append(name)
    if users:
        inputs.timing["align_stream"] = time.perf_counter() - t
    for stream, names in users.values():
        say(f"alignment stream {stream.source}: {len(stream.images)} captioned images, weight "
            f"{stream.weight:g}, for {', '.join(names)}")
    if ignoring:
        say(f"{', '.join(ignoring)} ignore{'s' if len(ignoring) == 1 else ''} the alignment stream "
            "(λ = 0 or align_data.weight = 0: it adds only the contrastive loss)")


def run_experiment(config: RunConfig, out_dir: str | Path, lambdas: Sequence[float] | None = None,
                   resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                   report: bool = True, inputs: PreparedInputs | None = None,
                   on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit the baselines and LLM-VEM at each λ, evaluate, write the run folder (and the HTML report).

    Parameters
    ----------
    config : RunConfig
    out_dir : path
        Run folder; refused if it exists unless ``resume`` (finished models are reused) or ``overwrite``.
    lambdas : sequence of float, optional
        λ values to train; default :func:`experiment_lambdas` (λ = 0 is the plain encoding model baseline).
    inputs : PreparedInputs, optional
        Already prepared inputs (default: :func:`~llmvem.inputs.prepare_inputs` of ``config``).
    on_stage : callable, optional
        Called with a short message as each stage starts (the CLI prints it).

    Returns
    -------
    dict
        The content of ``metrics.json`` (plus ``report``, the path of ``index.html``, when written).
    """
    t0 = time.perf_counter()
    say = on_stage or log.info
    models = experiment_models(config, lambdas, show_progress)
    out_dir = Path(out_dir)
    stages = []
    if config.evaluate.text_to_brain:  # llmvem.explain: text-to-brain readouts + voxel descriptions sections
        def text_to_brain(prepared: PreparedInputs) -> None:
            from llmvem.explain import add_text_to_brain_section

            add_text_to_brain_section(out_dir, config, prepared)

        stages.append(("text_to_brain", "text-to-brain readouts and voxel descriptions", text_to_brain))

    def prepare() -> PreparedInputs:
        if inputs is None:
            say("preparing inputs: dataset, captions, caption embeddings, image features")
        prepared = inputs if inputs is not None else prepare_inputs(extraction_config(config),
                                                                    show_progress=show_progress)
        load_model_streams(models, prepared, show_progress, say)
        return prepared

    # the frozen trunk's outputs (stage 2, predictions, text-to-brain) persist beside the features they extend
    budget = config.train.trunk_cache_mib * 2**20  # 0: the cache is off, and its file is left alone
    trunk_file = cache_root(config) / TRUNK_CACHE_FILE if inputs is None and budget > 0 else None
    if trunk_file is not None:
        shared_trunk_cache(budget).load(trunk_file)
    result = run_models(config, prepare, models, out_dir, resume=resume, overwrite=overwrite, extra_stages=stages,
                        pairs=experiment_pairs(list(models), config), say=say, started=t0)
    if trunk_file is not None and shared_trunk_cache().added:
        shared_trunk_cache().save(trunk_file)
    metrics = result.metrics
    if report:
        say("writing the report")
        from llmvem.report import write_report

        metrics["report"] = str(write_report([out_dir]))
    return metrics
