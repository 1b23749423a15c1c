"""Two-stage training of the LLM-VEM network: one engine over data keys (one subject or several), the task
(network + losses), checkpoints, distributed setup.

The scikit-learn-style wrapper ``LLMVEMEncoder`` lives in :mod:`llmvem.estimators`."""

from llmvem.train.captions_only import train_alignment_model
from llmvem.train.checkpoint import CheckpointManager, load_weights, save_weights
from llmvem.train.distributed import DistInfo, setup_distributed
from llmvem.train.engine import Engine
from llmvem.train.schedule import lr_factor
from llmvem.train.task import EncodingTask
from llmvem.train.trainer import (
    OUTPUT_NAMES,
    SubjectData,
    TrainResult,
    config_fingerprint,
    prepare_run_folder,
    train_encoding_model,
)

__all__ = [
    "OUTPUT_NAMES",
    "CheckpointManager",
    "DistInfo",
    "EncodingTask",
    "Engine",
    "SubjectData",
    "TrainResult",
    "config_fingerprint",
    "load_weights",
    "lr_factor",
    "prepare_run_folder",
    "save_weights",
    "setup_distributed",
    "train_alignment_model",
    "train_encoding_model",
]
