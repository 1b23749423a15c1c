"""The HTML report: run-folder validation, figures, cortical maps, the page and the ``llmvem report`` command."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llmvem.errors import DataValidationError
from llmvem.report import load_run, write_report
from llmvem.report.cortex import FSAVERAGE5_N_VERTICES, plot_surface_maps, voxels_to_fsaverage5
from llmvem.report.figures import bootstrap_mean_ci

N_VOX = 60
N_FS5 = 40  # voxels whose fsaverage index is an fsaverage5 vertex; the other 20 are dropped from maps
ROIS = {"early_visual": slice(0, 35), "higher_visual": slice(35, N_VOX)}
MODELS = {"ridge": ("Ridge (frozen features)", "ridge", None, 0.20),
          "llmvem_lambda0": ("LLM-VEM λ=0", "llmvem", 0.0, 0.30),
          "llmvem_lambda0.1": ("LLM-VEM λ=0.1", "llmvem", 0.1, 0.33)}
#: validation mean r: the ridge (fitted on train + val) is in-sample-best; validation chooses λ = 0.1
VAL_R = {"ridge": 0.5, "llmvem_lambda0": 0.28, "llmvem_lambda0.1": 0.31}
SECTIONS = ["Summary", "ROI accuracy", "Voxel scatter", "Comparisons", "λ curve", "Training curves",
            "Caption gallery", "Cortical map", "Configuration"]


# ---------------------------------------------------------------------------------------------- fixtures
def _stats(r: np.ndarray, acc: np.ndarray) -> dict:
    return {"mean_r": round(float(r.mean()), 4), "median_r": round(float(np.median(r)), 4),
            "mean_accuracy": round(float(acc.mean()), 2), "median_accuracy": round(float(np.median(acc)), 2),
            "n_voxels": int(r.size)}


def make_run(root: Path, name: str = "run", seed: int = 0, full: bool = True, fsaverage: bool = True) -> Path:
    """A synthetic run folder with every file of the contract (``full``) or only metrics.json."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    nc = rng.uniform(0.3, 0.9, N_VOX)
    r = {m: np.clip(base + 0.1 * rng.standard_normal(N_VOX), -0.2, 0.9) for m, (_, _, _, base) in MODELS.items()}
    acc = {m: 100 * r[m] ** 2 / nc for m in MODELS}
    models = {}
    for m, (label, kind, lam, _) in MODELS.items():
        entry = {"label": label, "kind": kind, "lambda": lam, **_stats(r[m], acc[m]),
                 "val_mean_r": VAL_R[m], "val_in_fit": kind == "ridge"}
        entry["per_roi"] = {roi: _stats(r[m][sl], acc[m][sl]) for roi, sl in ROIS.items()}
        entry["per_hemisphere"] = {"lh": _stats(r[m][:30], acc[m][:30]), "rh": _stats(r[m][30:], acc[m][30:])}
        models[m] = entry
    # One model records bootstrap CIs over test images; the others get voxel-bootstrap CIs in the report.
    for roi in ROIS:
        mr = models["ridge"]["per_roi"][roi]["mean_r"]
        models["ridge"]["per_roi"][roi]["mean_r_ci"] = [mr - 0.03, mr + 0.03]
    d = r["llmvem_lambda0.1"] - r["llmvem_lambda0"]
    comparison = {"a": "llmvem_lambda0", "b": "llmvem_lambda0.1", "metric": "mean_r",
                  "diff": round(float(d.mean()), 4), "ci_low": round(float(d.mean() - 0.02), 4),
                  "ci_high": round(float(d.mean() + 0.02), 4), "p_value": 0.0123,
                  "fraction_improved": round(float((d > 0).mean()), 3),
                  "per_roi": {roi: {"diff": round(float(d[sl].mean()), 4), "ci_low": -0.01, "ci_high": 0.05,
                                    "p_value": 0.2, "fraction_improved": 0.5} for roi, sl in ROIS.items()}}
    metrics = {"dataset": {"name": "synthetic", "n_train": 45, "n_val": 5, "n_test": 10, "n_voxels": N_VOX,
                           "rois": {roi: sl.stop - sl.start for roi, sl in ROIS.items()}},
               "models": models, "comparisons": [comparison],
               "timing": {"total_s": 12.5, "stages": {"captions": 1.5, "train": 10.0}},
               "captions": {"source": "dataset", "model_id": "none"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if not full:
        return run
    (run / "config.yaml").write_text("seed: 0\ndataset:\n  name: synthetic\ntrain:\n  epochs: 3\n")
    (run / "versions.json").write_text(json.dumps({"llmvem": "0.1.0", "torch": "2.13.0"}))
    arrays = {f"r__{m}": r[m] for m in MODELS} | {f"accuracy__{m}": acc[m] for m in MODELS}
    arrays |= {f"roi__{roi}": np.isin(np.arange(N_VOX), np.arange(N_VOX)[sl]) for roi, sl in ROIS.items()}
    arrays |= {"noise_ceiling": nc, "hemisphere": np.array(["lh"] * 30 + ["rh"] * 30)}
    if fsaverage:
        fs_index = np.concatenate([rng.choice(FSAVERAGE5_N_VERTICES, N_FS5, replace=False),
                                   rng.integers(FSAVERAGE5_N_VERTICES, 163842, N_VOX - N_FS5)])
        arrays["fsaverage_index"] = rng.permutation(fs_index)
    np.savez(run / "voxel_metrics.npz", **arrays)
    for m in ("llmvem_lambda0", "llmvem_lambda0.1"):
        (run / "models" / m).mkdir(parents=True)
        lines = ["stage,epoch,step,train_loss,val_mean_r,lr,voxel_loss,align_loss"]
        for step in range(12):
            stage = "align" if step < 6 else "finetune"
            loss = 2.0 * np.exp(-0.2 * step) + 0.05 * rng.random()
            val = "" if step % 3 else f"{0.05 * step / 3:.3f}"
            lines.append(f"{stage},{step // 4},{step},{loss:.4f},{val},0.001,{0.8 * loss:.4f},{0.2 * loss:.4f}")
        (run / "models" / m / "curves.csv").write_text("\n".join(lines) + "\n")
    lam_curve = [{"lambda": lam, "model": m, "mean_r": models[m]["mean_r"],
                  "mean_r_ci": [models[m]["mean_r"] - 0.02, models[m]["mean_r"] + 0.02],
                  "per_roi": {roi: models[m]["per_roi"][roi]["mean_r"] for roi in ROIS}}
                 for m, (_, kind, lam, _) in MODELS.items() if kind == "llmvem"]
    (run / "lambda_curve.json").write_text(json.dumps(lam_curve))
    (run / "gallery").mkdir()
    gallery = []
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        img.save(run / "gallery" / f"img{i:04d}.png")
        gallery.append({"image": f"gallery/img{i:04d}.png", "id": f"stim{i}",
                        "captions": {"dataset": [f"a photo number {i}", "a second <caption>"],
                                     "smolvlm": [f"generated caption {i}"]}})
    (run / "gallery.json").write_text(json.dumps(gallery))
    (run / "extra_sections").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run / "extra_sections" / "rsa.png")
    (run / "extra_sections" / "10_rsa.json").write_text(json.dumps(
        {"title": "Representational similarity", "html": "<p>RSA correlation 0.42</p>", "figures": ["rsa.png"]}))
    return run


class _Page(HTMLParser):
    """Collects headings, links, image sources and table-cell text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._tag: str | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.links.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        if tag in ("td", "th") and self._row is not None:
            self._row.append("")
        self._tag = tag

    def handle_endtag(self, tag):
        if tag == "table":
            self._row = None
        self._tag = None if tag in ("h2", "td", "th") else self._tag

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data)
        elif self._row is not None and self._row and self._tag not in ("h2", "h3", "p"):
            self._row[-1] += data


def parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def assert_links_resolve(index: Path, page: _Page) -> None:
    """The page is one file: every image is an embedded data URI, every link an anchor."""
    for link in page.links:
        assert link.startswith(("#", "data:image/")), f"link to a file outside the page: {link[:80]}"


# ------------------------------------------------------------------------------------------------- tests
def test_full_report_has_every_section_and_valid_links(tmp_path):
    run = make_run(tmp_path)
    index = write_report([run])
    assert index == (run / "report" / "index.html").resolve()
    page = parse(index)
    assert_links_resolve(index, page)
    for heading in SECTIONS + ["Representational similarity"]:
        assert heading in page.h2, heading
    html = index.read_text(encoding="utf-8")
    assert sum(link.startswith("data:image/png;base64,") for link in page.links) >= 8  # 6 figures + 2 thumbnails
    assert {"roi_accuracy.png", "voxel_scatter.png", "lambda_curve.png", "training_curves.png",
            "cortex_accuracy.png", "cortex_improvement.png"} <= {p.name for p in index.parent.glob("*.png")}

    # Summary: one row per model with its mean r as recorded (3 decimals) and per-ROI columns.
    metrics = json.loads((run / "metrics.json").read_text())
    summary = page.tables[0]
    assert summary[0][:7] == ["Model", "kind", "λ", "val mean r", "test mean r", "test median r",
                              "test mean acc. (%)"]
    assert summary[0][-2:] == ["early_visual test mean r", "higher_visual test mean r"]
    for name, m in metrics["models"].items():
        row = next(r for r in summary[1:] if name in r[0])
        assert row[3] == f"{m['val_mean_r']:.3f}" + (" (in fit)" if name == "ridge" else "")
        assert row[4] == f"{m['mean_r']:.3f}"
        assert row[6] == f"{m['mean_accuracy']:.1f}"
        assert row[-1] == f"{m['per_roi']['higher_visual']['mean_r']:.3f}"

    # Scatter: fraction of voxels where λ=0.1 beats λ=0, from the per-voxel arrays.
    vox = np.load(run / "voxel_metrics.npz")
    frac = np.mean(vox["r__llmvem_lambda0.1"] > vox["r__llmvem_lambda0"])
    assert f"{100 * frac:.1f}%</span> of {N_VOX} voxels lie above the diagonal" in html
    # ROI chart: accuracy (the run has a noise ceiling), per hemisphere; no interval resamples voxels. The run
    # records no test responses, so the hemisphere facets have no interval and the caption says so.
    assert "Test mean noise-normalised accuracy" in html and "over voxels" not in html.split("ROI chart")[1][:2000]
    assert "no interval where the run folder has neither test_responses.npy" in html
    # The chosen model is the validation choice (not the in-sample ridge), marked once and said why.
    assert html.count("(chosen on validation)") == 1
    assert ("validation chose LLM-VEM λ=0.1 (val mean r 0.310): chosen on validation among llmvem_lambda0, "
            "llmvem_lambda0.1; ridge not eligible: fitted on val. llmvem export submits this model.") in html
    # Comparisons table: the recorded diff, p and percent improved, plus one sub-row per ROI.
    comp = metrics["comparisons"][0]
    rows = next(t for t in page.tables if t[0][0] == "Comparison (B vs A)")
    assert len(rows) == 1 + 1 + len(ROIS)
    assert rows[1][3:] == [f"{comp['diff']:.4f}", f"[{comp['ci_low']:.4f}, {comp['ci_high']:.4f}]", "0.012",
                           f"{100 * comp['fraction_improved']:.1f}"]
    # Cortical maps say how many voxels are off fsaverage5.
    assert f"{N_VOX - N_FS5} of {N_VOX} voxels are not fsaverage5 vertices" in html
    # Gallery: thumbnails copied into the report, captions escaped, one column per caption source.
    gallery = next(t for t in page.tables if t[0][0] == "image")
    assert gallery[0] == ["image", "dataset", "smolvlm"]
    assert len(gallery) == 3 and "a second <caption>" in gallery[1][1]
    assert "a second &lt;caption&gt;" in html
    assert "RSA correlation 0.42" in html
    assert "<details><summary>config.yaml</summary>" in html and "epochs: 3" in html
    assert "torch" in html and "2.13.0" in html


def test_report_folder_is_portable(tmp_path):
    run = make_run(tmp_path, fsaverage=False)
    index = write_report([run], out_dir=tmp_path / "out")
    assert index == (tmp_path / "out" / "index.html").resolve()
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)
    page = parse(moved / "index.html")
    assert_links_resolve(moved / "index.html", page)
    for png in moved.glob("*.png"):  # the page needs none of the files beside it
        png.unlink()
    assert sum(link.startswith("data:image/png") for link in parse(moved / "index.html").links) >= 6
    assert "no cortical map: the data are not in fsaverage space" in (moved / "index.html").read_text()


def test_minimal_run_renders_with_notes(tmp_path):
    run = make_run(tmp_path, full=False)
    index = write_report([run], title="Only metrics")
    page = parse(index)
    assert_links_resolve(index, page)
    for heading in SECTIONS:
        assert heading in page.h2
    html = index.read_text(encoding="utf-8")
    assert "<title>Only metrics</title>" in html
    for note in ("no voxel scatter: voxel_metrics.npz is absent", "no training curves",
                 "no caption gallery", "no cortical map: the data are not in fsaverage space",
                 "no config.yaml in the run", "no versions.json in the run"):
        assert note in html, note
    # The λ curve falls back on the models' λ values in metrics.json (two λ values, no CIs).
    assert "from the models in metrics.json (no lambda_curve.json)" in html
    assert (index.parent / "lambda_curve.png").is_file()
    # ROI bars still drawn (hemispheres pooled) in accuracy; the run recorded intervals of r only, so none.
    assert "Test mean noise-normalised accuracy" in html and "as recorded by the run" not in html
    assert "no interval where the run folder has neither" in html


def test_two_runs_prefix_colliding_model_names(tmp_path):
    run_a = make_run(tmp_path, "run_a", seed=1, full=False)
    run_b = make_run(tmp_path, "run_b", seed=2, full=False)
    index = write_report([run_a, run_b], out_dir=tmp_path / "both")
    page = parse(index)
    summary = page.tables[0]
    assert summary[0][:2] == ["Model", "Run"]
    assert len(summary) == 1 + 2 * len(MODELS)
    for run in (run_a, run_b):
        metrics = json.loads((run / "metrics.json").read_text())
        for name, m in metrics["models"].items():
            row = next(r for r in summary[1:]
                       if r[0].removesuffix(" (chosen on validation)").endswith(f"{run.name}/{name}"))
            assert row[1] == run.name and row[5] == f"{m['mean_r']:.3f}"
    html = index.read_text(encoding="utf-8")
    assert "<h3>Run run_a</h3>" in html and "<h3>Run run_b</h3>" in html
    assert (index.parent / "lambda_curve_run_a.png").is_file() and (index.parent / "lambda_curve_run_b.png").is_file()


def test_missing_metrics_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match=r"metrics\.json"):
        write_report([tmp_path / "empty"])
    with pytest.raises(DataValidationError, match="does not exist"):
        load_run(tmp_path / "nowhere")


@pytest.mark.parametrize("damage, match", [
    (lambda run: (run / "metrics.json").write_text("{not json"), r"metrics\.json: line 1 column 2"),
    (lambda run: _edit_metrics(run, lambda m: m["models"]["ridge"].pop("mean_r")),
     r"metrics\.json: models\.ridge\.mean_r: missing"),
    (lambda run: _edit_metrics(run, lambda m: m["comparisons"][0].update(b="nope")),
     r"comparisons\[0\]\.b: model 'nope' is not in models"),
    (lambda run: _edit_npz(run, drop="r__ridge"), r"voxel_metrics\.npz: r__ridge: missing"),
    (lambda run: _edit_npz(run, hemisphere=np.array(["L"] * N_VOX)), r"hemisphere: values \['L'\]"),
    (lambda run: (run / "models" / "llmvem_lambda0" / "curves.csv").write_text("stage,epoch\nx,1\n"),
     r"curves\.csv: columns: missing \['step'"),
    (lambda run: (run / "gallery.json").write_text(json.dumps([{"image": "../../etc/passwd"}])),
     r"gallery\.json: \[0\]\.image: .* points outside the run folder"),
])
def test_malformed_files_name_file_and_field(tmp_path, damage, match):
    run = make_run(tmp_path, fsaverage=False)
    damage(run)
    with pytest.raises(DataValidationError, match=match):
        load_run(run)


def _edit_metrics(run: Path, edit) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))


def _edit_npz(run: Path, drop: str | tuple[str, ...] = (), **replace) -> None:
    drop = (drop,) if isinstance(drop, str) else drop
    with np.load(run / "voxel_metrics.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k not in drop}
    np.savez(run / "voxel_metrics.npz", **(arrays | replace))


def test_cortical_map_fallbacks(tmp_path):
    # No accuracy arrays and no λ > 0 model: the map shows r of the best model and the improvement map is
    # replaced by a note.
    run = make_run(tmp_path)
    _edit_npz(run, drop=tuple(f"accuracy__{m}" for m in MODELS) + ("r__llmvem_lambda0.1",))
    _edit_metrics(run, lambda m: (m["models"].pop("llmvem_lambda0.1"), m.update(comparisons=[])))
    (run / "lambda_curve.json").unlink()
    html = write_report([run]).read_text(encoding="utf-8")
    assert "Test Pearson r of LLM-VEM λ=0 on the inflated fsaverage5 surface" in html
    assert "no improvement map: the run needs an LLM-VEM model with λ = 0 and one with λ &gt; 0" in html
    assert "no voxel scatter: the run needs" in html and "no comparisons: metrics.json lists none" in html
    assert "no λ curve" in html
    # Every voxel off fsaverage5: a note instead of a map.
    _edit_npz(run, fsaverage_index=np.full(N_VOX, 20000))
    html = write_report([run]).read_text(encoding="utf-8")
    assert f"no cortical map: no voxel lies on an fsaverage5 vertex; {N_VOX} of {N_VOX} voxels" in html


def test_load_run_parses_values(tmp_path):
    run = load_run(make_run(tmp_path))
    assert list(run.models) == list(MODELS)
    assert run.models["llmvem_lambda0.1"].lam == 0.1 and run.models["ridge"].lam is None
    assert run.models["ridge"].per_roi["early_visual"].mean_r_ci is not None
    assert run.voxels is not None and run.voxels.n_voxels == N_VOX
    assert run.voxels.hemisphere.tolist().count("lh") == 30
    assert run.voxels.roi_masks["early_visual"].sum() == 35
    c = run.curves["llmvem_lambda0"]
    assert len(c) == 12 and c.stage[:1] == ["align"] and np.isnan(c.columns["val_mean_r"][1])
    assert [p.lam for p in run.lambda_curve] == [0.0, 0.1]
    assert run.gallery[1].captions["smolvlm"] == ["generated caption 1"]
    assert run.extra_sections[0].title == "Representational similarity"


def test_surface_maps_from_vertex_coordinates(tmp_path, monkeypatch):
    """A synthetic map (value = vertex y coordinate) lands on the right fsaverage5 vertices and is drawn."""
    from nilearn import plotting

    from llmvem.report.cortex import _fsaverage5

    mesh, _ = _fsaverage5()
    y = {h: mesh.parts[h].coordinates[:, 1] for h in ("left", "right")}
    rng = np.random.default_rng(3)
    lh = rng.choice(FSAVERAGE5_N_VERTICES, 500, replace=False)
    rh = rng.choice(FSAVERAGE5_N_VERTICES, 300, replace=False)
    off = rng.integers(FSAVERAGE5_N_VERTICES, 163842, 70)  # fsaverage vertices that fsaverage5 lacks
    index = np.concatenate([lh, rh, off, lh[:10]])  # the last 10 repeat lh vertices: their mean is drawn
    hemi = np.array(["lh"] * 500 + ["rh"] * 300 + ["rh"] * 70 + ["lh"] * 10)
    values = np.concatenate([y["left"][lh], y["right"][rh], np.full(70, 1e6), y["left"][lh[:10]] + 2.0])
    maps = voxels_to_fsaverage5(values, hemi, index)
    assert maps.n_dropped == 70 and maps.n_voxels == 880
    assert np.isfinite(maps.left).sum() == 500 and np.isfinite(maps.right).sum() == 300
    np.testing.assert_allclose(maps.right[rh], y["right"][rh])
    np.testing.assert_allclose(maps.left[lh[10:]], y["left"][lh[10:]])
    np.testing.assert_allclose(maps.left[lh[:10]], y["left"][lh[:10]] + 1.0)

    drawn = []
    original = plotting.plot_surf_stat_map

    def spy(*args, **kwargs):
        drawn.append((kwargs["hemi"], kwargs["view"], np.array(kwargs["stat_map"])))
        return original(*args, **kwargs)

    monkeypatch.setattr(plotting, "plot_surf_stat_map", spy)
    path = plot_surface_maps(maps, tmp_path / "y.png", "y coordinate", cmap="RdBu_r", symmetric=True)
    assert path.is_file() and Image.open(path).size == (1000, 500)
    views = ["lateral", "medial", "ventral", "posterior"]
    assert [(h, v) for h, v, _ in drawn] == [(h, v) for h in ("left", "right") for v in views]
    assert [int(np.isfinite(a).sum()) for _, _, a in drawn] == [500] * 4 + [300] * 4
    assert all(a.shape == (FSAVERAGE5_N_VERTICES,) for _, _, a in drawn)


def test_surface_maps_need_nothing_from_the_network(monkeypatch):
    """The fsaverage5 meshes ship with nilearn: loading them opens no socket."""
    import socket

    from llmvem.report import cortex

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    cortex._fsaverage5.cache_clear()
    mesh, sulcal = cortex._fsaverage5()
    assert mesh.parts["left"].n_vertices == FSAVERAGE5_N_VERTICES
    assert sulcal.data.parts["right"].shape == (FSAVERAGE5_N_VERTICES,)


def test_bootstrap_ci_matches_normal_theory():
    x = np.random.default_rng(0).normal(0.3, 0.1, 400)
    lo, hi = bootstrap_mean_ci(x, n_boot=2000, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_mean_ci(x, n_boot=2000, seed=1) == (lo, hi)
    assert np.isnan(bootstrap_mean_ci(np.array([1.0]))[0])


def test_cli_report_command(tmp_path):
    from typer.testing import CliRunner

    import llmvem.cli.report  # noqa: F401  (registers the command)
    from llmvem.cli import main
    from llmvem.cli.app import app

    run = make_run(tmp_path, full=False)
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep"), "--title", "T"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str((tmp_path / "rep" / "index.html").resolve()))
    assert "<title>T</title>" in (tmp_path / "rep" / "index.html").read_text()
    (tmp_path / "bad").mkdir()
    assert main(["report", str(tmp_path / "bad")]) == 2


def test_a_run_without_validation_scores_chooses_nothing_and_never_uses_test_r(tmp_path):
    run = make_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    for m in metrics["models"].values():
        m.pop("val_mean_r")
    (run / "metrics.json").write_text(json.dumps(metrics))
    html = write_report([run]).read_text(encoding="utf-8")
    assert "(chosen on validation)" not in html
    assert "no model was chosen: nothing chosen: no model has a validation mean r outside its fit" in html
    # the alignment comparison needs a λ > 0 model chosen on validation: none, so no scatter (no test-r fallback)
    assert "voxels lie above the diagonal" not in html
