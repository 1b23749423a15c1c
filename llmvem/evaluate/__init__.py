"""Evaluation: per-voxel metrics, the ridge baseline, paired statistics and RSA."""

from llmvem.evaluate.metrics import (
    evaluate_predictions,
    explained_variance,
    noise_normalized_accuracy,
    pearson_r,
    summarize,
)
from llmvem.evaluate.rsa import (
    algonauts2019_score,
    compare_rdms,
    leave_one_subject_out_ceiling,
    rdm,
    upper,
)
from llmvem.evaluate.stats import bootstrap_ci, paired_bootstrap
from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

__all__ = [
    "DEFAULT_ALPHAS",
    "RidgeCV",
    "algonauts2019_score",
    "bootstrap_ci",
    "compare_rdms",
    "evaluate_predictions",
    "explained_variance",
    "leave_one_subject_out_ceiling",
    "noise_normalized_accuracy",
    "paired_bootstrap",
    "pearson_r",
    "rdm",
    "summarize",
    "upper",
]
