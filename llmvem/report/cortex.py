"""Cortical maps on the fsaverage5 surface (four views, ROI outlines), drawn offline with the meshes bundled in
nilearn.

fsaverage meshes are nested: the first 10,242 vertices of each fsaverage hemisphere are the fsaverage5 vertices.
Voxels given as full-fsaverage vertex indices below 10,242 therefore land on fsaverage5 exactly; the others are
dropped (and counted), which keeps the maps exact without resampling. Full fsaverage density is not drawn:
nilearn bundles only the fsaverage5 meshes, and fetching the full mesh would download (nothing here may).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError

logger = logging.getLogger(__name__)

#: Vertices per hemisphere of fsaverage5.
FSAVERAGE5_N_VERTICES = 10242
#: Views drawn per hemisphere: lateral and medial, ventral (FFA, PPA, VWFA) and posterior (early visual cortex).
VIEWS = ("lateral", "medial", "ventral", "posterior")
_OUTLINE_COLORS = ("#00d0ff", "#ff3df5", "#7dff3d", "#ffd000", "#ffffff", "#ff7b00")


@dataclass
class SurfaceMaps:
    """Per-vertex fsaverage5 arrays of both hemispheres.

    Attributes
    ----------
    left, right : arrays of shape (10242,)
        Mean value of the voxels on each vertex; NaN where no voxel lies.
    n_dropped : int
        Voxels left out because their vertex is not an fsaverage5 vertex (index >= 10242).
    n_voxels : int
        Voxels given.
    """

    left: np.ndarray
    right: np.ndarray
    n_dropped: int
    n_voxels: int

    @property
    def n_vertices_with_data(self) -> int:
        """Vertices (both hemispheres) that carry a value."""
        return int(np.isfinite(self.left).sum() + np.isfinite(self.right).sum())


def voxels_to_fsaverage5(values: np.ndarray, hemisphere: np.ndarray, fsaverage_index: np.ndarray) -> SurfaceMaps:
    """Place per-voxel values on the fsaverage5 vertices of each hemisphere.

    Parameters
    ----------
    values : array of shape (n_voxels,)
        One value per voxel (NaN values are ignored).
    hemisphere : array of shape (n_voxels,) of "lh" / "rh"
    fsaverage_index : int array of shape (n_voxels,)
        Vertex of each voxel in the full fsaverage (fsaverage7) mesh of its hemisphere.

    Returns
    -------
    SurfaceMaps
        Two arrays of shape (10242,); vertices hit by several voxels get their mean.
    """
    values = np.asarray(values, dtype=np.float64)
    hemisphere = np.asarray(hemisphere).astype(str)
    index = np.asarray(fsaverage_index)
    n = values.shape[0]
    for name, arr in (("hemisphere", hemisphere), ("fsaverage_index", index)):
        if arr.shape != (n,):
            raise DataValidationError(None, name, f"shape {arr.shape}, expected ({n},) like the values")
    if not np.issubdtype(index.dtype, np.integer):
        raise DataValidationError(None, "fsaverage_index", f"dtype {index.dtype}, expected integers")
    on_fs5 = (index >= 0) & (index < FSAVERAGE5_N_VERTICES)
    maps = []
    for hemi in ("lh", "rh"):
        keep = on_fs5 & (hemisphere == hemi) & np.isfinite(values)
        sums = np.bincount(index[keep], weights=values[keep], minlength=FSAVERAGE5_N_VERTICES)
        counts = np.bincount(index[keep], minlength=FSAVERAGE5_N_VERTICES)
        with np.errstate(invalid="ignore", divide="ignore"):
            maps.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
    n_dropped = int((~on_fs5).sum())
    if n_dropped:
        logger.info("cortical map: %d of %d voxels are not fsaverage5 vertices and are left out", n_dropped, n)
    return SurfaceMaps(left=maps[0], right=maps[1], n_dropped=n_dropped, n_voxels=n)


def masks_to_fsaverage5(masks: dict[str, np.ndarray], hemisphere: np.ndarray, fsaverage_index: np.ndarray
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Voxel masks (ROIs or ROI classes) as vertex masks of the fsaverage5 hemispheres, for outlines.

    Parameters
    ----------
    masks : dict of str to bool array of shape (n_voxels,)
    hemisphere : array of shape (n_voxels,) of "lh" / "rh"
    fsaverage_index : int array of shape (n_voxels,)
        Full-fsaverage vertex of each voxel; voxels off fsaverage5 (index >= 10242) are left out.

    Returns
    -------
    dict of str to (left, right)
        Bool arrays of shape (10242,) per hemisphere; masks that hit no fsaverage5 vertex are left out.
    """
    hemisphere = np.asarray(hemisphere).astype(str)
    index = np.asarray(fsaverage_index)
    on_fs5 = (index >= 0) & (index < FSAVERAGE5_N_VERTICES)
    out = {}
    for name, mask in masks.items():
        sides = []
        for hemi in ("lh", "rh"):
            vertices = np.zeros(FSAVERAGE5_N_VERTICES, dtype=bool)
            vertices[index[np.asarray(mask, bool) & on_fs5 & (hemisphere == hemi)]] = True
            sides.append(vertices)
        if sides[0].any() or sides[1].any():
            out[name] = (sides[0], sides[1])
    return out


def _face_value(vertex_values: np.ndarray) -> float:
    """Colour of a mesh face: the mean of its vertices that carry data (NaN when none do).

    nilearn's default (plain mean) leaves a face blank as soon as one vertex lacks data, which hides sparse
    voxel sets entirely; ignoring the missing vertices lets each vertex colour the faces around it.
    """
    finite = vertex_values[np.isfinite(vertex_values)]
    return float(finite.mean()) if finite.size else float("nan")


@lru_cache(maxsize=1)
def _fsaverage5() -> tuple[Any, Any]:
    """Inflated fsaverage5 mesh and sulcal depth, from the files bundled with nilearn (no download)."""
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["inflated"]
    sulcal = datasets.load_fsaverage_data("fsaverage5", mesh_type="inflated", data_type="sulcal")
    return mesh, sulcal


def plot_surface_maps(maps: SurfaceMaps, path: Path, title: str, cmap: str = "viridis",
                      vmin: float | None = None, vmax: float | None = None, symmetric: bool = False,
                      colorbar_label: str = "",
                      outlines: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Draw lateral, medial, ventral and posterior views of both hemispheres in one PNG (nilearn, matplotlib).

    Parameters
    ----------
    maps : SurfaceMaps
        Per-vertex values from :func:`voxels_to_fsaverage5`.
    path : Path
        PNG file to write.
    title : str
        Figure title.
    cmap : str
        Matplotlib colour map.
    vmin, vmax : float, optional
        Colour range shared by all views; default: the 2nd and 98th percentiles of the data (symmetric around 0
        when ``symmetric``).
    symmetric : bool
        Centre the colour range on 0 (for differences).
    colorbar_label : str
        Label of the shared colour bar.
    outlines : dict of str to (left, right) bool arrays of shape (10242,), optional
        Regions drawn as coloured outlines with a legend (:func:`masks_to_fsaverage5`); at most six.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from nilearn import plotting

    data = np.concatenate([maps.left, maps.right])
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        raise ValueError("no vertex carries a value; nothing to draw")
    if symmetric:
        bound = float(np.percentile(np.abs(finite), 98)) or 1e-6
        lo, hi = -bound, bound
    else:
        lo, hi = (float(np.percentile(finite, q)) for q in (2, 98))
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-6
    outlines = dict(list((outlines or {}).items())[:len(_OUTLINE_COLORS)])
    mesh, sulcal = _fsaverage5()
    fig = Figure(figsize=(10.0, 5.0))
    width, height = 0.215, 0.42
    for row, hemi in enumerate(("left", "right")):
        for col, view in enumerate(VIEWS):
            ax = fig.add_axes((0.005 + col * width, 0.5 - row * 0.46, width, height), projection="3d")
            plotting.plot_surf_stat_map(
                mesh, stat_map=maps.left if hemi == "left" else maps.right, bg_map=sulcal, hemi=hemi, view=view,
                engine="matplotlib", cmap=cmap, colorbar=False, avg_method=_face_value, vmin=lo, vmax=hi,
                symmetric_cbar=False, axes=ax, figure=fig)
            for sides, color in zip(outlines.values(), _OUTLINE_COLORS, strict=False):
                region = sides[0] if hemi == "left" else sides[1]
                faces = np.asarray(mesh.parts[hemi].faces)
                # nilearn refuses vertex sets that share no face edge (sparse voxels): draw no outline then
                if (region[faces].sum(axis=1) >= 2).any():
                    plotting.plot_surf_contours(mesh, roi_map=region.astype(int), hemi=hemi, levels=[1],
                                                colors=[color], axes=ax, figure=fig)
            ax.set_box_aspect(None, zoom=1.4)
            ax.text2D(0.5, 0.0, f"{hemi} {view}", transform=ax.transAxes, ha="center", fontsize=8, color="0.3")
    cax = fig.add_axes((0.885, 0.3, 0.012, 0.45))
    cbar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=cmap), cax=cax)
    cbar.set_label(colorbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if outlines:
        handles = [Line2D([], [], color=c, lw=2) for c in _OUTLINE_COLORS[:len(outlines)]]
        fig.legend(handles, list(outlines), loc="lower right", fontsize=7, frameon=True, facecolor="0.35",
                   labelcolor="white", title="outlines", title_fontsize=7)
    fig.suptitle(title, fontsize=10, y=0.99)
    fig.savefig(path, dpi=100)
    return path
