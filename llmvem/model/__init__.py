"""The LLM-VEM network: backbone, voxel readout (PCA mapping), spatial readouts, alignment head and losses."""

from llmvem.model.head import AlignmentHead
from llmvem.model.losses import (
    LossParts,
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    group_ids_from_embeddings,
    info_nce,
    total_loss,
)
from llmvem.model.network import DEFAULT_KEY, EMBED_LAYER, LLMVEM, ModelOutput
from llmvem.model.readout import (
    LinearVoxelReadout,
    PCAVoxelReadout,
    Readout,
    default_pca_components,
    fit_pca,
)
from llmvem.model.spatial import FactorizedReadout, FlatPlusSpatialReadout, GaussianReadout, SpatialReadout

__all__ = [
    "DEFAULT_KEY",
    "EMBED_LAYER",
    "LLMVEM",
    "AlignmentHead",
    "FactorizedReadout",
    "FlatPlusSpatialReadout",
    "GaussianReadout",
    "LinearVoxelReadout",
    "LossParts",
    "ModelOutput",
    "PCAVoxelReadout",
    "Readout",
    "SpatialReadout",
    "contrastive_loss",
    "default_pca_components",
    "fit_pca",
    "gather_no_grad",
    "gather_with_grad",
    "group_ids_from_embeddings",
    "info_nce",
    "total_loss",
]
