"""The whole LLM-VEM experiment of one configuration: ridge, LLM-VEM at λ = 0 and at each λ > 0.

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
from llmvem.estimators import LLMVEMEncoder, RidgeEncoder, model_name
from llmvem.experiment import EXPERIMENT_OUTPUTS, ModelSpec, run_models
from llmvem.inputs import PreparedInputs, prepare_inputs

__all__ = ["EXPERIMENT_OUTPUTS", "PreparedInputs", "experiment_lambdas", "experiment_models", "llmvem_spec",
           "load_model_streams", "prepare_inputs", "ridge_spec", "run_experiment"]

log = logging.getLogger(__name__)


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


def experiment_models(config: RunConfig, lambdas: Sequence[float] | None = None, show_progress: bool = False
                      ) -> dict[str, ModelSpec]:
    """The models of :func:`run_experiment`: ``ridge`` (when in ``evaluate.baselines``), then
    ``llmvem_lambda<λ>`` for each λ (default :func:`experiment_lambdas`)."""
    models: dict[str, ModelSpec] = {}
    if "ridge" in config.evaluate.baselines:
        models["ridge"] = ridge_spec(config)
    for lam in sorted({float(x) for x in (experiment_lambdas(config) if lambdas is None else lambdas)}):
        models[model_name(lam)] = llmvem_spec(config, lam, show_progress=show_progress)
    return models


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
        prepared = inputs if inputs is not None else prepare_inputs(config, show_progress=show_progress)
        load_model_streams(models, prepared, show_progress, say)
        return prepared

    result = run_models(config, prepare, models, out_dir, resume=resume, overwrite=overwrite, extra_stages=stages,
                        say=say, started=t0)
    metrics = result.metrics
    if report:
        say("writing the report")
        from llmvem.report import write_report

        metrics["report"] = str(write_report([out_dir]))
    return metrics
