"""``llmvem predict`` (responses to texts or images from a trained model) and ``llmvem describe`` (voxel
descriptions from a vocabulary)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmvem.cli.app import app, check_output_file, progress_option, threads_option, use_progress, use_threads

_PREDICT_EXAMPLES = """\b
Examples:
  llmvem predict --run runs/demo --text "a red car on a street" --text "a face"
  llmvem predict --run runs/demo --text-file sentences.txt --out text_preds.h5
  llmvem predict --run runs/demo --images stimuli/ --out preds.h5
  llmvem predict --run runs/subj01 --model ridge --images stimuli/ --out ridge_preds.h5
  llmvem predict --run runs/demo --model llmvem_lambda0.5 --readout text --text "a dog"
  llmvem predict --run runs/train01 --fit-readouts        (a folder of llmvem train: fit the text readouts)
\b
HDF5 output: dataset `responses` (n, n_voxels) float32, `image_ids` (no extension) or `texts`, `roi/<name>`
masks, `hemisphere` and `fsaverage_index` per voxel when known,
attributes with the model (name, folder, lambda, backbone, text encoder) and, for text, the mapping.
"""

_DESCRIBE_EXAMPLES = """\b
Examples:
  llmvem describe --run runs/demo
  llmvem describe --run runs/demo --vocabulary words.txt --top 10 --roi semantic
  llmvem describe --run runs/demo --voxel 310 --voxel 412 --out descriptions.json
"""


def _read_texts(texts: list[str], text_file: Path | None) -> list[str]:
    from llmvem.explain.voxel_descriptions import read_vocabulary

    out = [t for t in texts]
    if text_file is not None:
        out += read_vocabulary(text_file)
    return out


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    from llmvem.report.tables import text_table

    typer.echo(text_table(header, rows))


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _echo_fit(evaluation: dict | None) -> None:
    if evaluation is None:
        typer.echo("the test split has no responses: the readouts are fitted but not scored")
        return
    preds = evaluation["predictors"]
    names = [n for n in ("image", "text_aligned", "text_readout") if n in preds]
    first = preds[names[0]]["summary"]
    rows = [["all voxels", *[f"{preds[n]['summary']['mean_r']:.3f}" for n in names]]]
    rows += [[roi, *[f"{preds[n]['summary']['per_roi'][roi]['mean_r']:.3f}" for n in names]]
             for roi in first["per_roi"]]
    typer.echo(f"test images predicted from their captions alone (mean r, {evaluation['n_test']} images):")
    _echo_table(["ROI", *[preds[n]["label"] for n in names]], rows)


@app.command("predict", epilog=_PREDICT_EXAMPLES)
def predict(
    run: Path = typer.Option(..., "--run", help="Experiment run folder (llmvem demo --out) or a trained-model "
                             "folder (config.yaml, model.safetensors)."),
    model: str | None = typer.Option(None, "--model", help="Model under RUN/models (default: the model the run "
                                     "chose on validation; for texts, the one chosen among its models with λ > 0)."),
    text: list[str] = typer.Option([], "--text", help="A text to predict responses to (repeatable)."),
    text_file: Path | None = typer.Option(None, "--text-file", help="UTF-8 file with one text per line (# "
                                          "comments and blank lines skipped)."),
    images: Path | None = typer.Option(None, "--images", help="Folder of images to predict responses to."),
    out: Path | None = typer.Option(None, "--out", help="HDF5 file for the predicted responses (required with "
                                    "--images)."),
    readout: str = typer.Option("aligned", "--readout", help="Text readout: 'aligned' (through the LLM-VEM "
                                "aligned space) or 'text' (direct caption-embedding readout)."),
    fit_readouts: bool = typer.Option(False, "--fit-readouts", help="(Re)fit the text-to-brain readouts of the "
                                      "model on its training data (captions and features from the cache) first."),
    device: str = typer.Option("auto", "--device", help="Device of the model and the text encoder."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Predict voxel responses of a trained LLM-VEM to texts or images (in-silico experiments).

    Texts go through the text-to-brain readouts stored in the model folder (no training data needed); the
    command prints how the mapping is made and the mean predicted response per ROI. Images go through the
    network itself.
    """
    show = use_progress(progress)
    use_threads(threads)
    from llmvem.errors import ConfigError
    from llmvem.estimators import RIDGE_FILE
    from llmvem.explain.predictions import (
        model_attributes,
        predict_image_folder,
        resolve_model_dir,
        roi_masks_of,
        voxel_layout_of,
        write_predictions_h5,
    )
    from llmvem.explain.text_to_brain import READOUTS, TextToBrain

    texts = _read_texts(text, text_file)
    if readout not in READOUTS:
        raise ConfigError(f"--readout: expected one of {', '.join(READOUTS)}, got {readout!r}")
    if images is not None and texts:
        raise ConfigError("give either texts (--text/--text-file) or --images, not both: they go to different "
                          "outputs")
    if images is None and not texts and not fit_readouts:
        raise ConfigError("nothing to predict: give --text TEXT (repeatable), --text-file FILE or --images DIR "
                          "(or --fit-readouts)")
    if images is not None and out is None:
        raise ConfigError("--images needs --out FILE.h5 for the predicted responses")
    blank = [k for k, t in enumerate(texts) if not t.strip()]
    if blank:
        raise ConfigError(f"--text: text {blank[0] + 1} is empty; expected words to predict responses to")
    from llmvem.data.text import check_text

    for k, t in enumerate(text):  # --text-file lines were checked as they were read
        check_text(t, "--text", f"text {k + 1}")
    check_output_file(out, "--out")
    model_dir = resolve_model_dir(run, model, for_text=images is None)
    if (model_dir / RIDGE_FILE).is_file() and (texts or fit_readouts):
        raise ConfigError(f"--model {model_dir.name}: a ridge on image features predicts from --images only "
                          "(texts need an LLM-VEM model with text-to-brain readouts)")

    if fit_readouts:
        from llmvem.config import load_config
        from llmvem.explain.text_to_brain import fit_model_text_to_brain
        from llmvem.inputs import prepare_inputs

        cfg = load_config(model_dir / "config.yaml")
        typer.echo(f"[llmvem] fitting the text-to-brain readouts of {model_dir}", err=True)
        inputs = prepare_inputs(cfg, show_progress=show)
        _, evaluation = fit_model_text_to_brain(model_dir, inputs, device=device)
        _echo_fit(evaluation)
        typer.echo(f"readouts: {model_dir / 'text_to_brain.safetensors'}")

    attrs = model_attributes(model_dir)
    if images is not None:
        assert out is not None
        responses, ids = predict_image_folder(model_dir, images, device=device, batch_size=batch_size)
        write_predictions_h5(out, responses, image_ids=ids, attrs=attrs, roi_masks=roi_masks_of(model_dir),
                             voxel_layout=voxel_layout_of(model_dir))
        typer.echo(f"predicted responses of {len(ids)} images × {responses.shape[1]} voxels ({model_dir.name}) → "
                   f"{out}")
        return
    if not texts:
        return
    t2b = TextToBrain.load(model_dir)
    responses = t2b.predict_texts(texts, readout=readout, encoder=t2b.load_encoder(device))  # type: ignore[arg-type]
    statement = t2b.mapping_statement(readout)  # type: ignore[arg-type]
    typer.echo(f"How the mapping is made: {statement}\n")
    rois = {"all voxels": None, **t2b.roi_masks}
    rows = [[_short(t), *[f"{(r if m is None else r[m]).mean():+.3f}" for m in rois.values()]]
            for t, r in zip(texts[:20], responses[:20], strict=False)]
    typer.echo(f"mean predicted response per ROI ({readout} readout, {model_dir.name}; units of the training "
               "responses):")
    _echo_table(["text", *rois], rows)
    if len(texts) > 20:
        typer.echo(f"... and {len(texts) - 20} more texts" + (f" (all in {out})" if out else ""))
    if out is not None:
        write_predictions_h5(out, responses, texts=texts, roi_masks=t2b.roi_masks,
                             attrs={**attrs, "readout": readout, "mapping": statement,
                                    "text_encoder": t2b.text_encoder})
        typer.echo(f"predicted responses of {len(texts)} texts × {responses.shape[1]} voxels → {out}")


@app.command("describe", epilog=_DESCRIBE_EXAMPLES)
def describe(
    run: Path = typer.Option(..., "--run", help="Experiment run folder or trained-model folder with "
                             "text-to-brain readouts."),
    model: str | None = typer.Option(None, "--model", help="Model under RUN/models (default as in predict)."),
    vocabulary: Path | None = typer.Option(None, "--vocabulary", help="UTF-8 file, one phrase per line "
                                           "(default: the model's vocabulary.txt)."),
    readout: str = typer.Option("aligned", "--readout", help="'aligned' or 'text'."),
    top: int = typer.Option(5, "--top", min=1, help="Phrases shown per ROI / voxel."),
    roi: list[str] = typer.Option([], "--roi", help="Only these ROIs (repeatable; default all)."),
    voxel: list[int] = typer.Option([], "--voxel", help="Also describe this voxel (index; repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the rankings to this JSON file."),
    device: str = typer.Option("auto", "--device", help="Device of the text encoder."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Describe ROIs and voxels by the phrases of a vocabulary with the highest predicted response.

    Each phrase is embedded with the model's text encoder and passed through its text-to-brain readout; an ROI's
    phrases are ranked by the mean z-scored predicted response of its voxels (score in standard deviations).
    """
    use_progress(progress)
    use_threads(threads)
    from llmvem.errors import ConfigError, DataValidationError
    from llmvem.explain.predictions import resolve_model_dir
    from llmvem.explain.text_to_brain import READOUTS, TextToBrain
    from llmvem.explain.voxel_descriptions import VOCABULARY_FILE, describe_voxels, read_vocabulary
    from llmvem.utils import write_json

    if readout not in READOUTS:
        raise ConfigError(f"--readout: expected one of {', '.join(READOUTS)}, got {readout!r}")
    model_dir = resolve_model_dir(run, model, for_text=True)
    t2b = TextToBrain.load(model_dir)
    vocab_path = vocabulary or model_dir / VOCABULARY_FILE
    if vocabulary is None and not vocab_path.is_file():
        raise ConfigError(f"{vocab_path}: missing; give --vocabulary FILE (one phrase per line)")
    phrases = read_vocabulary(vocab_path)
    unknown = [r for r in roi if r not in t2b.roi_masks]
    if unknown:
        raise ConfigError(f"--roi {unknown[0]!r}: unknown ROI; expected one of {', '.join(t2b.roi_masks) or 'none'}")
    bad = [v for v in voxel if not 0 <= v < t2b.n_voxels]
    if bad:
        raise DataValidationError(None, "--voxel", f"{bad[0]} is outside 0..{t2b.n_voxels - 1}")
    descr = describe_voxels(t2b, phrases, readout=readout, encoder=t2b.load_encoder(device))  # type: ignore[arg-type]
    import numpy as np

    masks = {r: t2b.roi_masks[r] for r in roi} if roi else {"all voxels": np.ones(t2b.n_voxels, bool),
                                                             **t2b.roi_masks}
    typer.echo(f"{len(phrases)} phrases from {vocab_path}, {readout} readout of {model_dir.name}")
    per_roi = {}
    for name, mask in masks.items():
        if not mask.any():
            continue
        per_roi[name] = descr.top_for_roi(mask, top)
        typer.echo(f"{name}: " + "; ".join(f"{p} ({s:+.2f})" for p, s in per_roi[name]))
    per_voxel = {}
    for v in voxel:
        per_voxel[str(v)] = descr.top_for_voxel(v, top)
        typer.echo(f"voxel {v}: " + "; ".join(f"{p} ({s:+.3f})" for p, s in per_voxel[str(v)]))
    if out is not None:
        write_json(out, {"model": str(model_dir), "readout": readout, "vocabulary": str(vocab_path),
                         "n_phrases": len(phrases), "per_roi": per_roi, "per_voxel": per_voxel})
        typer.echo(f"rankings → {out}")
