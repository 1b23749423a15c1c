"""llmvem: LLM-aligned visual encoding models (LLM-VEM) — caption, embed, train, evaluate, report.

The public Python API (everything else is reachable through the submodules)::

    import llmvem
    ds = llmvem.load_dataset("virtual")                 # or an Algonauts subject folder, a generic folder, "v4:ROOT:SESSION"
    cfg = llmvem.load_config("demo")                    # typed RunConfig; llmvem.apply_overrides(cfg, ["model.lambda_align=0.5"])
    metrics = llmvem.run_experiment(cfg, "runs/demo")   # ridge, λ = 0 and λ > 0 models, statistics, HTML report
    encoder = llmvem.LLMVEMEncoder(cfg).fit(ds, text_embeddings)   # notebook-style fit / predict
    ridge = llmvem.RidgeEncoder(layers=["block10"]).fit(features_train, responses_train)
    encoder = llmvem.load_trained_model("runs/demo/models/llmvem_lambda0.1")

Names are imported lazily so ``import llmvem`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_dataset": "llmvem.data",
    "EncodingDataset": "llmvem.data.dataset",
    "make_virtual_brain": "llmvem.data.virtual_brain",
    "RunConfig": "llmvem.config",
    "load_config": "llmvem.config",
    "apply_overrides": "llmvem.config",
    "prepare_inputs": "llmvem.inputs",
    "run_experiment": "llmvem.pipeline",
    "train_encoding_model": "llmvem.train",
    "LLMVEMEncoder": "llmvem.estimators",
    "RidgeEncoder": "llmvem.estimators",
    "PerVoxelChoice": "llmvem.estimators",
    "load_trained_model": "llmvem.train.load",
    "evaluate_predictions": "llmvem.evaluate.metrics",
    "paired_bootstrap": "llmvem.evaluate.stats",
    "RidgeCV": "llmvem.model.ridge",
    "run_models": "llmvem.experiment",
    "write_report": "llmvem.report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'llmvem' has no attribute {name!r}")
