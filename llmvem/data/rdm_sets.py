"""Image sets that come with brain representational dissimilarity matrices (RDMs), for RSA evaluation.

:func:`load_kriegeskorte92` reads the 92-object set of Kriegeskorte et al. (2008, Neuron) as shipped with the
rsatoolbox demos. Files in ``root`` (read with :func:`scipy.io.loadmat`)::

    Kriegeskorte_Neuron2008_supplementalData.mat   stimuli_92objs (92 images 175x175x3 uint8 with a category
                                                   name each), categoryVectors (92x12) + categoryLabels,
                                                   RDMs_mIT_hIT_fig1 (monkey IT and group human IT RDMs as
                                                   condensed vectors of 92*91/2 = 4186 dissimilarities)
    92_brainRDMs.mat                               RDMs: human IT RDMs (92x92), 4 subjects x 2 sessions
    92_modelRDMs.mat                               optional: Models, reference model RDMs (92x92)

Dissimilarities are 1 - Pearson correlation of response patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.data.images import ArrayImages
from llmvem.errors import DataValidationError

N_K92 = 92
_SUPPLEMENT = "Kriegeskorte_Neuron2008_supplementalData.mat"
_BRAIN = "92_brainRDMs.mat"
_MODELS = "92_modelRDMs.mat"
_HIT_NAME = re.compile(r"hIT\s*\|\s*(\w+)\s*\|\s*Session:\s*(\d+)")


@dataclass
class RDMSet:
    """Images and the brain RDMs measured for them.

    Attributes
    ----------
    name : str
    images : ArrayImages
        ``n_images`` stimuli (for the 92-object set: uint8 175x175 RGB on grey).
    categories : dict of str to bool array of shape (n_images,)
        Category membership (``"animate"``, ``"face"``, ``"human"``...).
    category_names : str array of shape (n_images,)
        The category of each image (``"human face"``, ``"natural inanimate"``...).
    human_it : array of shape (n_subjects, n_sessions, n_images, n_images)
        Human IT RDMs per subject and session.
    human_it_subjects : list of str
        Subject codes, in the order of ``human_it``'s first axis.
    monkey_it : array of shape (n_images, n_images)
        Monkey IT RDM (cell recordings).
    model_rdms : dict of str to array of shape (n_images, n_images)
        Reference model RDMs shipped with the set (may be empty).
    source : str
    """

    name: str
    images: ArrayImages
    categories: dict[str, np.ndarray]
    category_names: np.ndarray
    human_it: np.ndarray
    human_it_subjects: list[str]
    monkey_it: np.ndarray
    model_rdms: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def human_it_mean(self) -> np.ndarray:
        """Human IT RDM averaged over subjects and sessions, shape (n_images, n_images)."""
        return self.human_it.mean(axis=(0, 1))

    @property
    def human_it_per_subject(self) -> np.ndarray:
        """Human IT RDMs averaged over sessions, shape (n_subjects, n_images, n_images)."""
        return self.human_it.mean(axis=1)


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataValidationError(path, "file", "not found")
    try:
        return loadmat(path, squeeze_me=True)
    except (OSError, ValueError, NotImplementedError) as exc:
        raise DataValidationError(path, "file", f"not a readable MATLAB file ({exc})") from exc


def _field(mat: dict[str, Any], key: str, path: Path) -> Any:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataValidationError(path, key, f"variable missing; found {found}")
    return mat[key]


def _check_rdm(rdm: Any, path: Path, name: str, n: int = N_K92) -> np.ndarray:
    """Square, symmetric, zero-diagonal float64 RDM; a condensed vector is expanded (scipy squareform order)."""
    from scipy.spatial.distance import squareform

    arr = np.asarray(rdm, dtype=np.float64)
    if arr.ndim == 1:
        if arr.size != n * (n - 1) // 2:
            raise DataValidationError(path, name, f"condensed RDM of length {arr.size}, expected {n * (n - 1) // 2}")
        arr = squareform(arr, checks=False)
    if arr.shape != (n, n):
        raise DataValidationError(path, name, f"RDM of shape {arr.shape}, expected ({n}, {n})")
    if not np.isfinite(arr).all():
        raise DataValidationError(path, name, "contains NaN/Inf; expected finite dissimilarities")
    if not np.allclose(arr, arr.T, atol=1e-6) or np.abs(np.diag(arr)).max() > 1e-6:
        raise DataValidationError(path, name, "expected a symmetric RDM with a zero diagonal")
    return arr


def load_kriegeskorte92(root: str | Path) -> RDMSet:
    """Load the 92-object image set with its human and monkey IT RDMs (files in the module docstring).

    Parameters
    ----------
    root : str or Path
        Folder holding the ``.mat`` files (e.g. ``../shared/data/kriegeskorte92``).

    Returns
    -------
    RDMSet
        92 images (ids ``obj01``...``obj92``), 12 categories, human IT RDMs of shape (4, 2, 92, 92) for
        subjects BE, KO, SN, TI x sessions 1, 2, the monkey IT RDM (92, 92) and the reference model RDMs.
    """
    root = Path(root)
    sup_path = root / _SUPPLEMENT
    sup = _loadmat(sup_path)
    stimuli = np.atleast_1d(_field(sup, "stimuli_92objs", sup_path))
    if stimuli.size != N_K92:
        raise DataValidationError(sup_path, "stimuli_92objs", f"{stimuli.size} images, expected {N_K92}")
    pixels = [np.asarray(s["image"]) for s in stimuli]
    if any(p.shape != pixels[0].shape or p.ndim != 3 or p.shape[2] != 3 for p in pixels):
        raise DataValidationError(sup_path, "stimuli_92objs.image", "expected equally sized H x W x 3 images")
    images = ArrayImages(np.stack(pixels).astype(np.uint8), ids=[f"obj{i + 1:02d}" for i in range(N_K92)])
    category_names = np.array([str(s["category"]) for s in stimuli])

    vectors = np.asarray(_field(sup, "categoryVectors", sup_path))
    labels = [str(x) for x in np.atleast_1d(_field(sup, "categoryLabels", sup_path))]
    if vectors.shape != (N_K92, len(labels)):
        raise DataValidationError(
            sup_path, "categoryVectors", f"shape {vectors.shape}, expected ({N_K92}, {len(labels)}) to match "
            "categoryLabels")
    categories = {label: vectors[:, j].astype(bool) for j, label in enumerate(labels)}

    fig1 = {str(r["name"]): r["RDM"] for r in np.atleast_1d(_field(sup, "RDMs_mIT_hIT_fig1", sup_path))}
    monkey = [k for k in fig1 if k.startswith("mIT")]
    if len(monkey) != 1:
        raise DataValidationError(sup_path, "RDMs_mIT_hIT_fig1", f"expected one mIT RDM, found names {sorted(fig1)}")
    monkey_it = _check_rdm(fig1[monkey[0]], sup_path, f"RDMs_mIT_hIT_fig1[{monkey[0]}]")

    brain_path = root / _BRAIN
    brain = np.asarray(_field(_loadmat(brain_path), "RDMs", brain_path))
    if brain.ndim != 2:
        raise DataValidationError(brain_path, "RDMs", f"struct array of shape {brain.shape}, expected (subjects, sessions)")
    subjects: list[str] = []
    human_it = np.empty((*brain.shape, N_K92, N_K92))
    for (i, j), rec in np.ndenumerate(brain):
        name = str(rec["name"])
        match = _HIT_NAME.search(name)
        if match is None or int(match.group(2)) != j + 1:
            raise DataValidationError(brain_path, f"RDMs[{i},{j}].name", f"{name!r}; expected 'hIT | XX | Session: {j + 1}'")
        if j == 0:
            subjects.append(match.group(1))
        elif match.group(1) != subjects[i]:
            raise DataValidationError(brain_path, f"RDMs[{i},{j}].name", f"{name!r}; expected subject {subjects[i]}")
        human_it[i, j] = _check_rdm(rec["RDM"], brain_path, f"RDMs[{i},{j}].RDM")

    model_rdms: dict[str, np.ndarray] = {}
    model_path = root / _MODELS
    if model_path.is_file():
        for rec in np.atleast_1d(_field(_loadmat(model_path), "Models", model_path)):
            model_rdms[str(rec["name"])] = _check_rdm(rec["RDM"], model_path, f"Models[{rec['name']}]")
    return RDMSet(name="kriegeskorte92", images=images, categories=categories, category_names=category_names,
                  human_it=human_it, human_it_subjects=subjects, monkey_it=monkey_it, model_rdms=model_rdms,
                  source=str(root))
