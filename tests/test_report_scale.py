"""The report at the Algonauts scale: 31 ROIs in classes, two hemispheres, several models."""

from __future__ import annotations

import numpy as np
import pytest
from fake_runs import ROI_NAMES, make_scaled_run
from matplotlib.backends.backend_agg import FigureCanvasAgg

from llmvem.evaluate.metrics import noise_normalized_accuracy, pearson_r
from llmvem.report import baseline_and_aligned, load_run
from llmvem.report.figures import FacetBar, plot_training_curves, roi_facet_figure
from llmvem.report.page import chosen_model
from llmvem.report.roi import ALGONAUTS_ROI_CLASSES, roi_classes, roi_values


def _bars(n_rois: int, n_models: int) -> list[FacetBar]:
    rng = np.random.default_rng(0)
    classes = roi_classes(ROI_NAMES[:n_rois])
    out = []
    for roi in ROI_NAMES[:n_rois]:
        for h in ("lh", "rh"):
            for m in range(n_models):
                v = float(rng.uniform(5, 60))
                out.append(FacetBar(f"model {m}", roi, classes[roi], h, v, (v - 2, v + 2)))
    return out


def _overlaps(fig, texts) -> list[tuple[str, str]]:
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


@pytest.mark.parametrize("n_rois", [8, 31])
def test_roi_facets_hold_every_roi_without_overlapping_labels(n_rois):
    fig = roi_facet_figure(_bars(n_rois, 3), "accuracy (%)", {"lh": "left hemisphere", "rh": "right hemisphere"})
    FigureCanvasAgg(fig).draw()  # constrained layout runs on draw
    classes = [c for c, rois in ALGONAUTS_ROI_CLASSES.items() if set(rois) & set(ROI_NAMES[:n_rois])]
    assert [ax.get_label() for ax in fig.axes] == [f"{c}|{h}" for c in classes for h in ("lh", "rh")]
    shown = []
    for ax in fig.axes:
        row, col = ax.get_label().split("|")
        rois = [r for r in ROI_NAMES[:n_rois] if r in ALGONAUTS_ROI_CLASSES[row]]
        assert len(ax.patches) == 3 * len(rois)  # one bar per model and ROI
        if col == "lh":
            labels = [t.get_text() for t in ax.get_yticklabels()]
            assert labels == rois and ax.get_ylabel() == row
            shown += labels
            assert not _overlaps(fig, ax.get_yticklabels())
    assert shown == ROI_NAMES[:n_rois]
    all_ticks = [t for ax in fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()]
    assert not _overlaps(fig, all_ticks)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["model 0", "model 1", "model 2"]
    # the legend sits above every facet, not over the bars
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).y0 >= max(ax.get_window_extent(renderer).y1 for ax in fig.axes)


def test_roi_values_bootstrap_over_images_and_choose_on_validation(tmp_path):
    run_dir = make_scaled_run(tmp_path, n_rois=31, n_models=3, n_per_hemi=150, n_test=30)
    run = load_run(run_dir)
    values = roi_values(run, n_boot=200)
    # 3 models × (all voxels + ROIs with voxels) × 2 hemispheres, every value in accuracy, intervals over images
    rois_with_voxels = [r for r in ROI_NAMES if run.voxels.roi_masks[r].any()]
    assert len(values) == 3 * (1 + len(rois_with_voxels)) * 2
    assert {v.metric for v in values} == {"accuracy"} and {v.ci_source for v in values} == {"images"}
    y = np.load(run_dir / "test_responses.npy")
    pred = np.load(run_dir / "models" / "llmvem_lambda0.1" / "predictions_test.npy")
    acc = noise_normalized_accuracy(pearson_r(y, pred), run.voxels.noise_ceiling)
    v1v_lh = next(v for v in values if v.model == "llmvem_lambda0.1" and v.roi == "V1v" and v.hemisphere == "lh")
    mask = run.voxels.roi_masks["V1v"] & (run.voxels.hemisphere == "lh")
    assert v1v_lh.mean == pytest.approx(acc[mask].mean(), rel=1e-5)
    assert v1v_lh.ci[0] < v1v_lh.mean < v1v_lh.ci[1] and v1v_lh.roi_class == "prf-visualrois"
    assert v1v_lh.n_voxels == int(mask.sum())
    both = roi_values(run, metrics=["r", "accuracy"], n_boot=200)  # one bootstrap per model serves both metrics
    assert len(both) == 2 * len(values)
    r_v1v = next(v for v in both if v.model == "llmvem_lambda0.1" and v.roi == "V1v" and v.hemisphere == "lh"
                 and v.metric == "r")
    assert r_v1v.mean == pytest.approx(pearson_r(y, pred)[mask].mean(), rel=1e-5)
    assert r_v1v.ci[0] < r_v1v.mean < r_v1v.ci[1]
    assert next(v for v in both if v == v1v_lh) == v1v_lh  # same seed, same accuracy interval
    # validation picks λ = 0.1 (val 0.35) although λ = 1 is not in this 3-model run; test r plays no part
    base, aligned = baseline_and_aligned(run)
    assert base.name == "llmvem_lambda0" and aligned.name == "llmvem_lambda0.1"
    run.models["llmvem_lambda0.1"].val_mean_r = 0.01  # now λ=0.1 is the only aligned model: still compared
    assert baseline_and_aligned(run)[1].name == "llmvem_lambda0.1"
    assert chosen_model(run).model != "llmvem_lambda0.1"  # ... but the run's chosen model is another one
    run.models["llmvem_lambda0.1"].val_mean_r = float("nan")  # no validation r: never chosen by test r
    assert baseline_and_aligned(run)[1] is None


def test_training_curves_draw_the_loss_terms(tmp_path):
    run = load_run(make_scaled_run(tmp_path, n_rois=4, n_models=2, n_per_hemi=40, n_test=10))
    path = plot_training_curves({k: c for k, c in run.curves.items()}, tmp_path / "curves.png")
    assert path.is_file()
    # redraw into a figure we can inspect: the plot function's legend names the three loss columns
    from llmvem.report import figures

    captured = {}
    original = figures.Figure.savefig

    def keep(self, *args, **kwargs):
        captured["fig"] = self
        return original(self, *args, **kwargs)

    figures.Figure.savefig = keep
    try:
        plot_training_curves(run.curves, tmp_path / "again.png")
    finally:
        figures.Figure.savefig = original
    legend = captured["fig"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train_loss", "train_voxel_loss", "train_align_loss"]


@pytest.mark.slow
def test_report_at_31_rois_is_one_file_with_chosen_model(tmp_path):
    from llmvem.report import write_report

    run_dir = make_scaled_run(tmp_path, n_rois=31, n_models=3, n_per_hemi=200, n_test=30)
    html = write_report([run_dir]).read_text(encoding="utf-8")
    assert ("validation chose LLM-VEM λ=0.1 (val mean r 0.350): chosen on validation among ridge, llmvem_lambda0, "
            "llmvem_lambda0.1. llmvem export submits this model.") in html
    assert "31 ROIs" in html and "bootstrap intervals over test images (1000 resamples" in html
    assert 'src="data:image/png;base64,' in html and 'src="roi' not in html
    assert "Outlines: prf-visualrois, floc-bodies, floc-faces, floc-places, floc-words" in html
    assert "val mean r" in html and "test mean r" in html
    assert "dashed: per ROI class (mean of its ROIs" in html  # 31 per-ROI λ lines would be unreadable
