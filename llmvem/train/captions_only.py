"""Captions-only training: the core and alignment head trained on captioned images that have no brain data.

The engine's key set is then one caption stream (:class:`~llmvem.train.stream.CaptionStream`) and no subject:
the network has no voxel readout, the loss is the stream's contrastive term only, and — with no responses to
validate on — every epoch of each stage runs and the last epoch's weights are kept. Such a network is an image
encoder aligned to the captions' text space (e.g. on Flickr8k), whose core output or aligned embedding can be
compared with brain data by RSA (``bench/bench_rsa92.py --alignment-only``).

The run folder receives what :func:`~llmvem.train.trainer.fit_keys` writes (``config.yaml``, ``versions.json``,
``curves.csv``, ``checkpoints/``) plus ``model.safetensors`` and ``training.json``.
"""

from __future__ import annotations

from pathlib import Path

from llmvem.config import RunConfig
from llmvem.embed.base import ImageBackbone
from llmvem.model.network import LLMVEM
from llmvem.train.checkpoint import save_weights
from llmvem.train.distributed import barrier, cleanup_distributed, setup_distributed
from llmvem.train.stream import CaptionStream
from llmvem.train.trainer import check_sources, config_fingerprint, fit_keys, prepare_run_folder
from llmvem.utils import write_json

__all__ = ["train_alignment_model"]


def train_alignment_model(config: RunConfig, stream: CaptionStream, backbone: ImageBackbone | None = None,
                          out_dir: str | Path = "run", resume: bool = False, overwrite: bool = False,
                          show_progress: bool = True) -> LLMVEM:
    """Train the core (``model.core``) and alignment head on a caption stream alone (no brain data).

    Parameters
    ----------
    config : RunConfig
        Uses ``model`` (``lambda_align`` > 0; it only scales the loss), ``train`` (stages; early stopping does not
        apply: there is no validation), ``backbone.layers`` and ``seed``.
    stream : CaptionStream
        ``n`` captioned images with caption embeddings of shape (n, text_dim) and, for stage 1 without a
        backbone, features of every ``backbone.layers`` layer, shape (n, d_layer) (plus ``"pooled"`` without a
        core). Its ``weight`` must be > 0.
    backbone : ImageBackbone, optional
        Needed for stage 2 and when ``stream.features`` is None.
    out_dir : path
        Run folder; refused if it exists and is not empty, unless ``resume`` or ``overwrite``.
    resume, overwrite, show_progress : bool
        As in :func:`~llmvem.train.trainer.train_encoding_model`.

    Returns
    -------
    LLMVEM
        The trained network (last epoch of the last stage), eval mode, without voxel readouts: call it with
        ``with_voxels=False``; ``readout_input`` is the core output (n, core_dim) and ``embedding`` (with
        ``with_embedding=True``) the aligned embedding (n, text_dim).

    Raises
    ------
    ConfigError
        ``model.lambda_align`` = 0, stream weight 0, or no backbone where one is needed.
    DataValidationError
        Stream sizes that do not match (caption embeddings, features).
    """
    info = setup_distributed(config.train.device)
    out_dir = Path(out_dir)
    try:
        check_sources(config, [], backbone, info.world_size, streams=[stream])
        if info.is_main:
            prepare_run_folder(out_dir, resume, overwrite)
        barrier(info)
        identity = {"name": stream.name, "n_align_stream": len(stream.images)}
        fingerprint = config_fingerprint(config)
        fit = fit_keys(config, [], backbone, out_dir, info, resume=resume, fingerprint=fingerprint,
                       data_identity=identity, show_progress=show_progress, streams=[stream])
        engine = fit.engine
        if info.is_main:
            save_weights(out_dir / "model.safetensors", engine.model_state(engine.final_stage),
                         {"config_hash": fingerprint, "includes_backbone": str(engine.final_stage == 2)})
            write_json(out_dir / "training.json", {
                "stages": engine.stages, "dataset": identity, "readout_layers": list(config.backbone.layers),
                "n_features": fit.network.n_features, "lambda_align": float(config.model.lambda_align),
                "selection": "last epoch (captions only: no validation)", "precision": engine.precision,
                "device": str(info.device), "world_size": info.world_size, "seconds": fit.seconds,
                "config_hash": fingerprint})
        barrier(info)
        return fit.network
    finally:
        cleanup_distributed(info)
