"""Kept so ``from llmvem.model.ridge import RidgeCV`` still works; the model lives in :mod:`llmvem.model.ridge`."""

from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

__all__ = ["DEFAULT_ALPHAS", "RidgeCV"]
