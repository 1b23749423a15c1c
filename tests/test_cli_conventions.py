"""CLI conventions: --version, one --progress/--no-progress everywhere, config validate, data inspect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from test_adapters import N_CHALLENGE_TEST, N_TRAIN, make_subject
from test_captions_store import MeanColourCaptioner

import llmvem
from llmvem.cli import app, main
from llmvem.utils import progress, progress_enabled


def _leaf_commands(group, prefix: str = ""):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            yield from _leaf_commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmvem {version('llmvem')}"


def test_every_command_has_one_progress_flag_and_an_example():
    commands = dict(_leaf_commands(typer.main.get_command(app)))
    assert {"export", "config validate", "data inspect", "train", "predict", "report", "caption", "embed"} <= set(
        commands)
    for name, cmd in commands.items():
        flags = [opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)]
        assert flags.count("--progress") == 1 and flags.count("--no-progress") == 1, name
        assert "--quiet" not in flags, name
        assert "Example" in (cmd.help or "") + (cmd.epilog or ""), name


def test_library_is_quiet_from_python_and_the_flag_turns_bars_on_and_off(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("LLMVEM_NO_PROGRESS", raising=False)
    assert not progress_enabled()
    list(progress(range(3), desc="quiet bar"))
    assert "quiet bar" not in capsys.readouterr().err
    from test_report import make_run

    run = make_run(tmp_path, full=False)
    assert main(["report", str(run), "--out", str(tmp_path / "a"), "--progress"]) == 0
    assert "report sections" in capsys.readouterr().err and progress_enabled()
    assert main(["report", str(run), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "report sections" not in capsys.readouterr().err and not progress_enabled()
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()  # weight-loading bars follow the flag too
    main(["report", str(run), "--out", str(tmp_path / "c"), "--progress"])
    assert hf_logging.is_progress_bar_enabled()


def test_config_validate_resolves_and_refuses_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    subject = make_subject(tmp_path)["subj"]
    assert main(["config", "validate", "demo", "--set", f"data.spec={subject}",
                 "--set", f"cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert f"Algonauts subject subj01: 30 lh + 25 rh vertices, {N_CHALLENGE_TEST} challenge test images" in out
    assert "train.device: auto -> " in out and "will be created" in out and out.strip().endswith("config: ok")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["config", "validate", "demo", "--set", "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device: 'cuda' but CUDA is not available" in err
    assert main(["config", "validate", "demo", "--set", "data.spec=/nonexistent/subj01"]) == 2
    err = capsys.readouterr().err  # the loader's own check, as train gives it
    assert "/nonexistent/subj01: dataset: no such file or folder" in err and err.count("\n") == 1
    assert main(["config", "validate", "demo", "--set", "backbone.name=resnet50"]) == 2
    assert "backbone.name: 'resnet50'" in capsys.readouterr().err


def test_data_inspect_shows_validation_challenge_images_units_and_store(tmp_path, capsys):
    from llmvem.captions.store import CaptionStore
    from llmvem.data import load_dataset

    subject = make_subject(tmp_path)["subj"]
    ds = load_dataset(subject)
    hashes = ds.all_images().content_hashes()
    with CaptionStore(tmp_path / "c.sqlite") as store:
        h = store.register(MeanColourCaptioner())
        store.add(h, [(hashes[i], f"id{i}", ["a caption"]) for i in range(7)])
    assert main(["data", "inspect", str(subject), "--json", "--store", str(tmp_path / "c.sqlite")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_val"] > 0 and summary["n_train"] + summary["n_val"] + summary["n_test"] == N_TRAIN
    assert summary["n_challenge_test"] == N_CHALLENGE_TEST
    assert summary["n_captioned_images"] == 7 and summary["captioned_per_config"] == {h: 7}
    median = float(np.median(ds.noise_ceiling))
    assert summary["noise_ceiling_median"].startswith(f"{median:.4f} (fraction of variance; the files' percent")
    assert main(["data", "inspect", str(subject), "--store", str(tmp_path / "missing.sqlite")]) == 2


@pytest.mark.parametrize("name", ["export", "config"])
def test_new_commands_have_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert "Example" in capsys.readouterr().out
    assert llmvem.__name__ == "llmvem"
