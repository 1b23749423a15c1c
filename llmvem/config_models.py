"""``evaluate.models``: the models an experiment fits, declared in the config (YAML or ``--set``).

An empty list (the default) keeps the classic experiment: the ridge baseline, LLM-VEM at λ = 0 and at each λ > 0
(:func:`llmvem.pipeline.experiment_models`). A non-empty list replaces it by exactly these models, fitted in order
by the one experiment runner, saved in the run folder and served by ``llmvem predict``:

``kind: ridge``
    Voxelwise ridge on frozen features (``layers``, default ``backbone.layers``; map specs such as
    ``block5@grid7`` are flattened — the feature-matched ridge of a spatial network). With ``layer_sets`` the
    set is chosen on validation from train-only fits, then refitted on ``fit_splits``.
``kind: banded_ridge``
    Banded ridge, one band per entry of ``bands`` (each a list of layers), per-voxel band weights and α by CV.
``kind: llmvem``
    An LLM-VEM network: the run's config with the overrides of ``set`` (dotted keys, as ``--set``) and
    ``lambda_align``; ``seeds: k > 1`` trains k seeds and averages them (a seed ensemble).
``kind: blend``
    A weighted average of earlier ``members``, weights on a simplex grid (``weight_step``) chosen on validation
    from train-only fits; its validation r is out of fold.

``compare_to`` lists earlier models to compare with on the test split (paired bootstrap, this model − that one).

Examples
--------
.. code-block:: yaml

    evaluate:
      models:
        - {name: ridge_maps, kind: ridge, layers: [block5@grid7, block8@grid7]}
        - {name: spatial, kind: llmvem, lambda_align: 0, seeds: 3,
           set: {backbone.spatial_layers: [block5@grid7, block8@grid7], model.spatial_readout: factorized}}
        - {name: spatial_blend, kind: blend, members: [spatial, ridge_maps], compare_to: [spatial]}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MODEL_KINDS", "ModelEntry", "check_model_entries"]

MODEL_KINDS = ("ridge", "banded_ridge", "llmvem", "blend")
#: A model name becomes a folder name (``models/<name>/``): one path component, no separators, no ``..``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
#: Fields that belong to one kind only (the others must keep their defaults).
_KIND_FIELDS = {"ridge": {"layers", "layer_sets", "fit_splits"}, "banded_ridge": {"bands", "n_iter", "fit_splits"},
                "llmvem": {"lambda_align", "set", "seeds"}, "blend": {"members", "weight_step"}}


class ModelEntry(BaseModel):
    """One model of ``evaluate.models`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description="folder name under models/ (letters, digits, _ . + -; at most 64)")
    kind: Literal["ridge", "banded_ridge", "llmvem", "blend"]
    label: str | None = Field(None, description="name in tables and the report (default: the name)")
    layers: list[str] | None = Field(None, description="ridge: layers (default backbone.layers)")
    layer_sets: list[list[str]] = Field(default_factory=list, description="ridge: candidates chosen on validation")
    bands: list[list[str]] = Field(default_factory=list, description="banded_ridge: the layers of each band")
    n_iter: int = Field(20, ge=0, le=1000, description="banded_ridge: random band weightings besides the equal one")
    fit_splits: list[Literal["train", "val"]] = Field(default_factory=lambda: ["train", "val"],
                                                      description="ridge/banded_ridge: splits of the final fit")
    lambda_align: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                                       description="llmvem: alignment weight (default model.lambda_align)")
    set: dict[str, Any] = Field(default_factory=dict, description="llmvem: config overrides, dotted keys")
    seeds: int = Field(1, ge=1, le=20, description="llmvem: seeds averaged (a seed ensemble when > 1)")
    members: list[str] = Field(default_factory=list, description="blend: earlier models")
    weight_step: float = Field(0.1, gt=0.0, le=1.0, description="blend: step of the weight grid")
    compare_to: list[str] = Field(default_factory=list, description="earlier models compared with on test")

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if not NAME_PATTERN.match(self.name) or ".." in self.name:
            raise ValueError(f"name {self.name!r}: expected 1-64 letters, digits, '_', '.', '+' or '-' (a folder "
                             "name), starting with a letter or digit")
        defaults = ModelEntry.model_construct()
        own = _KIND_FIELDS[self.kind]
        stray = sorted(f for fields in _KIND_FIELDS.values() for f in fields - own
                       if f in self.model_fields_set and getattr(self, f) != getattr(defaults, f, None))
        if stray:
            raise ValueError(f"{stray[0]} does not apply to kind {self.kind!r} (it takes {', '.join(sorted(own))})")
        if self.kind == "banded_ridge" and (len(self.bands) < 1 or not all(self.bands)):
            raise ValueError("banded_ridge needs bands: a list of layer lists, e.g. [[block5@grid7], [block8@grid7]]")
        if self.kind == "blend" and len(set(self.members)) < 2:
            raise ValueError("blend needs at least two different members (names of earlier models)")
        if self.kind == "ridge" and any(not s for s in self.layer_sets):
            raise ValueError("layer_sets: every candidate needs at least one layer")
        return self


def check_model_entries(entries: list[ModelEntry]) -> list[ModelEntry]:
    """Names unique; ``members`` and ``compare_to`` name earlier entries. Raises ValueError naming the entry."""
    seen: list[str] = []
    for i, e in enumerate(entries):
        if e.name in seen:
            raise ValueError(f"[{i}] name {e.name!r} is used twice; each model needs its own name")
        for field in ("members", "compare_to"):
            unknown = [m for m in getattr(e, field) if m not in seen]
            if unknown:
                raise ValueError(f"[{i}] ({e.name}) {field}: {unknown[0]!r} is not an earlier model (earlier: "
                                 f"{', '.join(seen) or 'none'})")
        seen.append(e.name)
    return entries
