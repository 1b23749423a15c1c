"""Statistics over several run folders: one model against another across sessions (or subjects), seeds and images.

Each session (a V4 recording, an NSD subject) is its own encoding problem with its own images and neurons, so a
claim "model B beats model A" is tested three ways at once, as the V4 benchmark reports it:

* per session, the difference of mean test r, and over sessions a **Wilcoxon signed-rank** and a **sign test**
  (:func:`session_tests`: how many sessions improved, and could that be chance);
* pooled over every neuron of every session, a **bootstrap** that resamples the test images within each session
  and, for trained networks, the **seeds** (:func:`llmvem.evaluate.seeds.seed_bootstrap`): a seed ensemble's
  members (``models/<name>/seed<i>/``) are the seeds; a deterministic model (a ridge) is the same for every seed.

:func:`compare_runs` reads the run folders that ``llmvem train`` writes (one per session) and returns all of it;
``llmvem compare`` prints it.

Examples
--------
>>> from llmvem.evaluate.pooled import compare_runs
>>> res = compare_runs(["runs/v4_190925", "runs/v4_210322"], "ridge_inputs", "spatial")   # doctest: +SKIP
>>> res["pooled"]["delta_mean_r"], res["pooled"]["ci"], res["over_sessions"]["n_improved"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r

__all__ = ["compare_predictions", "compare_runs", "model_seeds", "run_model_summary", "runs_mean_ci", "session_tests"]


def session_tests(diffs: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank and sign tests of per-session differences (b − a).

    Returns
    -------
    dict
        ``n_sessions``, ``n_improved``, ``n_worse``, ``mean_diff``, ``sign_test_p`` and ``wilcoxon_p`` (None when
        undefined: no session differs, or fewer than 2 sessions).
    """
    from scipy import stats

    d = np.asarray(list(diffs), dtype=np.float64)
    n_pos, n_neg = int(np.sum(d > 0)), int(np.sum(d < 0))
    out: dict[str, Any] = {"n_sessions": int(d.size), "n_improved": n_pos, "n_worse": n_neg,
                           "mean_diff": float(d.mean()) if d.size else None}
    out["sign_test_p"] = float(stats.binomtest(n_pos, n_pos + n_neg, 0.5).pvalue) if n_pos + n_neg else None
    out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue) if d.size >= 2 and np.any(d != 0) else None
    return out


def _load(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    from llmvem.report.untrusted import load_run_array  # the run-folder trust boundary (no pickles, bounded)

    return np.asarray(load_run_array(path, "predictions", shape), dtype=np.float64)


def model_seeds(run_dir: str | Path, model: str) -> list[np.ndarray]:
    """Test predictions of ``model`` in a run folder, one array (n_test, n_voxels) per seed: the members of a seed
    ensemble (``models/<model>/seed<i>/predictions_test.npy``), else the model's own predictions.

    Raises
    ------
    DataValidationError
        The model folder or its predictions are missing, or have another shape than ``test_responses.npy``.
    """
    from llmvem.report.untrusted import check_name

    run = Path(run_dir)
    check_name(model, run / "metrics.json", "model")
    y = _load(run / "test_responses.npy")
    folder = run / "models" / model
    if not folder.is_dir():
        raise DataValidationError(folder, "model", f"no such model in {run}")
    members = sorted((p for p in folder.glob("seed*") if (p / "predictions_test.npy").is_file()),
                     key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30)
    files = [p / "predictions_test.npy" for p in members] or [folder / "predictions_test.npy"]
    return [_load(f, y.shape) for f in files]


def run_model_summary(run_dir: str | Path, model: str) -> dict[str, Any]:
    """``mean_r`` and ``median_r`` over neurons of ``model``'s test predictions in one run, and, for a seed
    ensemble, the same per member (``member_mean_r``, ``member_median_r``) and their means (``one_network_*``)."""
    run = Path(run_dir)
    y = _load(run / "test_responses.npy")
    own = _load(run / "models" / model / "predictions_test.npy", y.shape)
    r = pearson_r(y, own)
    out: dict[str, Any] = {"mean_r": float(np.nanmean(r)), "median_r": float(np.nanmedian(r))}
    seeds = model_seeds(run, model)
    if len(seeds) > 1:
        rs = [pearson_r(y, p) for p in seeds]
        out["member_mean_r"] = [float(np.nanmean(x)) for x in rs]
        out["member_median_r"] = [float(np.nanmedian(x)) for x in rs]
        out["one_network_mean_r"] = float(np.mean(out["member_mean_r"]))
        out["one_network_median_r"] = float(np.mean(out["member_median_r"]))
    return out


def runs_mean_ci(run_dirs: Sequence[str | Path], model: str, n_boot: int = 1000, seed: int = 0,
                 members: bool = True) -> dict[str, Any]:
    """Mean test r of ``model`` over every neuron of several run folders, with the 95% interval of the bootstrap
    that resamples test images within each run and, for a seed ensemble compared through its ``members``, the
    seeds (:func:`~llmvem.evaluate.seeds.seed_mean_ci`; the draws of :func:`compare_runs` with the same ``seed``).

    Returns
    -------
    dict
        ``mean_r``, ``ci``, ``per_seed_mean_r``, ``n_seeds``, ``n_voxels`` and ``runs`` (the run names).
    """
    from llmvem.evaluate.seeds import seed_mean_ci

    if not run_dirs:
        raise DataValidationError(None, "runs", "expected at least one run folder")
    ys, preds = [], []
    for run_dir in run_dirs:
        run = Path(run_dir)
        y = _load(run / "test_responses.npy")
        ys.append(y)
        preds.append(model_seeds(run, model) if members else
                     [_load(run / "models" / model / "predictions_test.npy", y.shape)])
    keep = min(len(p) for p in preds)  # runs trained with different numbers of seeds: the common first ones
    res = seed_mean_ci(ys, [p[:keep] for p in preds], n_boot=n_boot, seed=seed)
    return {**res, "runs": [Path(r).name for r in run_dirs]}


def compare_runs(run_dirs: Sequence[str | Path], a: str, b: str, n_boot: int = 1000, seed: int = 0,
                 members: bool = True) -> dict[str, Any]:
    """Model ``b`` against model ``a`` over several run folders (sessions): per session, over sessions and pooled.

    Parameters
    ----------
    run_dirs : sequence of path
        One run folder per session, each with ``test_responses.npy`` and both models' test predictions.
    a, b : str
        Model names (``models/<name>/``); b − a is reported.
    n_boot : int
        Bootstrap resamples of the pooled interval.
    seed : int
    members : bool
        Compare seed ensembles through their members (one network per seed, the claim about a trained network);
        False compares the ensembles' averaged predictions.

    Returns
    -------
    dict
        ``sessions`` ({run name: {a_mean_r, b_mean_r, diff}}), ``over_sessions`` (:func:`session_tests` of the
        per-session differences of mean r), ``pooled`` (:func:`~llmvem.evaluate.seeds.seed_bootstrap`:
        ``delta_mean_r``, ``ci``, ``p``, ``n_seeds``, ``n_voxels``...), and ``a``, ``b``.
    """
    if not run_dirs:
        raise DataValidationError(None, "runs", "expected at least one run folder")
    items: dict[str, tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]] = {}
    for run_dir in run_dirs:
        run = Path(run_dir)
        y = _load(run / "test_responses.npy")
        sa = model_seeds(run, a) if members else [_load(run / "models" / a / "predictions_test.npy", y.shape)]
        sb = model_seeds(run, b) if members else [_load(run / "models" / b / "predictions_test.npy", y.shape)]
        items[run.name] = (y, sa, sb)
    return {"a": a, "b": b, **compare_predictions(items, n_boot=n_boot, seed=seed)}


def compare_predictions(sessions: Mapping[str, tuple[np.ndarray, Sequence[np.ndarray], Sequence[np.ndarray]]],
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """B against A over sessions from predictions in memory (what :func:`compare_runs` computes from run folders).

    Parameters
    ----------
    sessions : mapping of name to (y, seeds_a, seeds_b)
        Per session (named by its run folder, in :func:`compare_runs`) its test responses (n_test, n_voxels) and, per model, one prediction per seed (one for a
        deterministic model, repeated to the other's count).

    Returns
    -------
    dict
        ``sessions`` ({name: {a_mean_r, b_mean_r, diff, n_seeds}}), ``over_sessions`` (:func:`session_tests`) and
        ``pooled`` (:func:`~llmvem.evaluate.seeds.seed_bootstrap`).
    """
    from llmvem.evaluate.seeds import seed_bootstrap

    if not sessions:
        raise DataValidationError(None, "sessions", "expected at least one session")
    ys, pa, pb, per = [], [], [], {}
    for name, (y, sa, sb) in sessions.items():
        sa, sb = list(sa), list(sb)
        k = max(len(sa), len(sb))
        for label, s in (("a", sa), ("b", sb)):
            if len(s) not in (1, k):
                raise DataValidationError(name, f"seeds of model {label}", f"{len(s)} seeds against {k}; expected "
                                          "the same number, or one (a deterministic model)")
        sa, sb = (s * k if len(s) == 1 else s for s in (sa, sb))
        ra = float(np.mean([np.nanmean(pearson_r(y, p)) for p in sa]))
        rb = float(np.mean([np.nanmean(pearson_r(y, p)) for p in sb]))
        per[name] = {"a_mean_r": ra, "b_mean_r": rb, "diff": rb - ra, "n_seeds": k}
        ys.append(y)
        pa.append(sa)
        pb.append(sb)
    n_seeds = {len(s) for s in pa}
    if len(n_seeds) != 1:  # sessions trained with different numbers of seeds: keep the common first ones
        keep = min(n_seeds)
        pa, pb = [s[:keep] for s in pa], [s[:keep] for s in pb]
    pooled = seed_bootstrap(ys, pa, pb, n_boot=n_boot, seed=seed)
    return {"sessions": per, "over_sessions": session_tests([s["diff"] for s in per.values()]), "pooled": pooled}
