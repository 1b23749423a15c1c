"""Explaining a trained LLM-VEM: text-to-brain predictions, voxel descriptions, in-silico predictions.

* :mod:`llmvem.explain.text_to_brain` — readouts from the aligned (and the caption) embedding space to voxels,
  stored in the model folder; predicted responses to any text; honest evaluation from test captions alone.
* :mod:`llmvem.explain.voxel_descriptions` — rank a vocabulary by predicted response per voxel / ROI.
* :mod:`llmvem.explain.predictions` — choose a model in a run folder, predict images, write HDF5.
* :mod:`llmvem.explain.sections` — the report sections and the pipeline hook
  (:func:`add_text_to_brain_section`).
"""

from llmvem.explain.predictions import (
    predict_image_folder,
    read_predictions_h5,
    resolve_model_dir,
    write_predictions_h5,
)
from llmvem.explain.sections import add_text_to_brain_section, select_text_model
from llmvem.explain.text_to_brain import (
    LinearReadout,
    TextToBrain,
    aligned_image_outputs,
    evaluate_text_to_brain,
    fit_model_text_to_brain,
    fit_text_to_brain,
)
from llmvem.explain.voxel_descriptions import (
    VoxelDescriptions,
    caption_corpus,
    category_agreement,
    category_phrases,
    default_vocabulary,
    describe_voxels,
    read_vocabulary,
    virtual_brain_vocabulary,
)

__all__ = [
    "LinearReadout",
    "TextToBrain",
    "VoxelDescriptions",
    "add_text_to_brain_section",
    "aligned_image_outputs",
    "caption_corpus",
    "category_agreement",
    "category_phrases",
    "default_vocabulary",
    "describe_voxels",
    "evaluate_text_to_brain",
    "fit_model_text_to_brain",
    "fit_text_to_brain",
    "predict_image_folder",
    "read_predictions_h5",
    "read_vocabulary",
    "resolve_model_dir",
    "select_text_model",
    "virtual_brain_vocabulary",
    "write_predictions_h5",
]
