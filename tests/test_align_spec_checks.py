"""A bad ``align_data.spec`` is reported by ``llmvem config validate`` and ``llmvem ablate`` up front, with the
message training gives; a good one passes without reading an image."""

from __future__ import annotations

import pytest
from test_ablation import _config

from llmvem.cli import main
from llmvem.config import RunConfig, apply_overrides
from llmvem.errors import DataValidationError, one_line
from llmvem.train.stream import check_align_data, load_align_stream


def _folder(tmp_path, name="captioned", images=True, captions=True):
    root = tmp_path / name
    root.mkdir()
    if images:
        (root / "images").mkdir()
        # not an image at all: a check that decoded images would fail on it
        (root / "images" / "a.jpg").write_bytes(b"not a jpeg")
    if captions:
        (root / "captions.csv").write_text("image,caption\na.jpg,a dog\n")
    return root


def _bad_specs(tmp_path) -> dict[str, list[str]]:
    return {"missing folder": [f"align_data.spec={tmp_path / 'nowhere'}"],
            "no images/": [f"align_data.spec={_folder(tmp_path, 'flat', images=False)}"],
            "no caption file": [f"align_data.spec={_folder(tmp_path, 'mute', captions=False)}"],
            "missing captions_file": [f"align_data.spec={_folder(tmp_path, 'named')}",
                                      "align_data.captions_file=human.csv"],
            "unknown option": ["align_data.spec=virtual-scenes:n=20,colour=red"],
            "bad n": ["align_data.spec=virtual-scenes:n=1"],
            "malformed": ["align_data.spec=virtual-scenes:n20"]}


def _training_message(overrides: list[str]) -> str:
    """The one-line error that loading the stream for training gives."""
    with pytest.raises(DataValidationError) as info:
        load_align_stream(apply_overrides(RunConfig(), overrides), backbone=None)  # fails before the backbone
    return one_line(str(info.value))


def test_config_validate_reports_a_bad_align_spec_as_training_does(tmp_path, capsys):
    for case, overrides in _bad_specs(tmp_path).items():
        expected = _training_message(overrides)
        argv = ["config", "validate", "demo", "--set", f"cache_dir={tmp_path / 'cache'}"]
        for o in overrides:
            argv += ["--set", o]
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (case, err, expected)


def test_config_validate_passes_a_good_align_spec_without_reading_images(tmp_path, capsys, monkeypatch):
    import llmvem.data.virtual_brain as vb

    def no_scenes(*args, **kwargs):
        raise AssertionError("validate must not draw the scenes")

    monkeypatch.setattr(vb, "make_virtual_scenes", no_scenes)
    root = _folder(tmp_path)
    for spec, says in ((str(root), f"captioned folder {root} (images/, caption file {root / 'captions.csv'})"),
                       ("virtual-scenes:n=50,seed=3", "50 virtual scenes (seed 3)")):
        assert main(["config", "validate", "demo", "--set", f"cache_dir={tmp_path / 'cache'}",
                     "--set", f"align_data.spec={spec}"]) == 0
        out = capsys.readouterr().out
        assert f"align data: {says}" in out and out.strip().endswith("config: ok"), out
    assert "unused" in check_align_data(apply_overrides(RunConfig(), [f"align_data.spec={root}",
                                                                       "model.lambda_align=0"]))
    assert check_align_data(RunConfig()) is None


def test_ablate_fails_on_a_bad_align_spec_before_any_model_is_written(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "cache")
    bad = _bad_specs(tmp_path)
    for case in ("no caption file", "malformed"):
        expected = _training_message(bad[case])
        out = tmp_path / f"ablation_{case.replace(' ', '_')}"
        argv = ["ablate", "--config", cfg, "--sources", "dataset,shuffled", "--out", str(out)]
        for o in bad[case]:
            argv += ["--set", o]
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (case, err)
        assert not out.exists() and not (tmp_path / "cache").exists(), case
