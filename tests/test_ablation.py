"""Caption-source ablation: source parsing, the shuffled-captions control, and ``llmvem ablate`` end to end."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import yaml

from llmvem.ablation import ablation_table, parse_sources, run_ablation, source_config
from llmvem.cli import main
from llmvem.config import RunConfig, apply_overrides, load_config
from llmvem.data import load_dataset
from llmvem.errors import ConfigError, RunFolderError
from llmvem.evaluate.metrics import pearson_r
from llmvem.inputs import caption_dataset, shuffle_caption_sets


# ------------------------------------------------------------------------------------------------ sources
def test_sources_parse_into_caption_configs(tmp_path):
    caps = tmp_path / "Human Caps.csv"
    caps.write_text("image,caption\nx,a cat\n")
    srcs = parse_sources(f"dataset, labels,shuffled,shuffled:labels,file:{caps},transformers:/models/llava-1.5-7b,"
                         "openai:qwen2-vl@http://gpu1:8000/v1,openai:llava")
    assert [s.name for s in srcs] == ["dataset", "labels", "shuffled", "shuffled_labels", "file_human_caps",
                                      "transformers_llava_1_5_7b", "openai_qwen2_vl", "openai_llava"]
    assert [s.model for s in srcs][:2] == ["captions_dataset", "captions_labels"]
    base = apply_overrides(RunConfig(), ["captions.backend=file", f"captions.captions_file={caps}",
                                         "captions.shuffle_seed=3", "captions.base_urls=[http://a:1/v1]"])
    cfgs = {s.name: source_config(base, s).captions for s in srcs}
    # "shuffled" permutes the config's own source; every other source sets its backend and clears the rest
    assert cfgs["shuffled"].backend == "file" and cfgs["shuffled"].shuffle and cfgs["shuffled"].shuffle_seed == 3
    assert cfgs["shuffled_labels"].backend == "labels" and cfgs["shuffled_labels"].shuffle
    assert cfgs["labels"].backend == "labels" and cfgs["labels"].captions_file is None and not cfgs["labels"].shuffle
    assert cfgs["file_human_caps"].captions_file == str(caps)
    assert cfgs["transformers_llava_1_5_7b"].model == "/models/llava-1.5-7b"
    assert cfgs["openai_qwen2_vl"].base_urls == ["http://gpu1:8000/v1"] and cfgs["openai_qwen2_vl"].model == "qwen2-vl"
    assert cfgs["openai_llava"].base_urls == ["http://a:1/v1"]  # no @URL: the config's servers
    assert base.captions.backend == "file" and not base.captions.shuffle  # the base config is not modified


@pytest.mark.parametrize("spec,message", [
    ("dataset,vlm", "unknown kind 'vlm'"),
    ("dataset,dataset", "repeats the source 'dataset'"),
    ("file:/no/such/caps.csv", "is not a file"),
    ("openai:llava@gpu1:8000", "not an http(s) URL"),
    ("labels:top5", "takes no argument"),
    ("shuffled:shuffled", "shuffling a shuffled source"),
    (" , ", "at least one caption source"),
])
def test_bad_sources_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match="" if message is None else message.replace("(", r"\(").replace(")", r"\)")):
        parse_sources(spec)


# ---------------------------------------------------------------------------------------- shuffled control
def test_shuffled_captions_are_a_seeded_permutation_within_each_split(tmp_path):
    ds = load_dataset("virtual", n_train=30, n_test=10, image_size=24, val_fraction=0.2, seed=0)
    cfg = apply_overrides(RunConfig(), [f"cache_dir={tmp_path}", "captions.backend=dataset"])
    plain, info = caption_dataset(cfg, ds, show_progress=False)
    assert plain == {s: ds.captions_for(s) for s in ds.splits} and "shuffled" not in info
    shuffled, sinfo = caption_dataset(apply_overrides(cfg, ["captions.shuffle=true"]), ds, show_progress=False)
    assert sinfo["shuffled"] is True and sinfo["shuffle_seed"] == 0
    assert sinfo["config_hash"] == info["config_hash"]  # the same stored captions, only re-assigned
    for split in ("train", "val", "test"):
        assert len(shuffled[split]) == len(plain[split])
        # the same caption sets (a permutation, no caption crosses a split) ...
        assert Counter(map(tuple, shuffled[split])) == Counter(map(tuple, plain[split]))
        # ... but most images now carry another image's description (scene descriptions are unique)
        moved = np.mean([a != b for a, b in zip(shuffled[split], plain[split], strict=True)])
        assert moved >= 0.5
    again = shuffle_caption_sets(plain, 0)
    assert again == shuffled  # seeded
    assert shuffle_caption_sets(plain, 1)["train"] != shuffled["train"]


# ------------------------------------------------------------------------------------------- end to end
def _config(tmp_path, cache, **extra) -> str:
    cfg = {"data": {"spec": "virtual", "n_train": 100, "n_test": 48, "image_size": 48, "seed": 0},
           "captions": {"backend": "dataset"},
           # a small randomly initialised ResNet at the images' own 48 px keeps stage 2 cheap on a CPU
           "backbone": {"name": "timm:resnet10t", "pretrained": False, "image_size": 48,
                        "layers": ["layer2", "pooled"], "batch_size": 64},
           "model": {"readout_l2": 0.1, "lambda_align": 0.5},
           "train": {"device": "cpu",
                     "stage1": {"epochs": 8, "batch_size": 32, "lr": 0.003, "early_stopping_patience": None},
                     "stage2": {"epochs": 1, "batch_size": 30, "lr": 0.0003, "backbone_lr": 0.0003,
                                "unfreeze_last_n": 1}},
           "evaluate": {"bootstrap": 200, "baselines": ["lambda0"]},
           "cache_dir": str(cache)}
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    """One `llmvem ablate` run on a tiny virtual brain: dataset captions, shuffled captions, and a caption file
    holding exactly the dataset's captions (so it must train exactly the dataset-caption model)."""
    tmp = tmp_path_factory.mktemp("ablate")
    ds = load_dataset("virtual", n_train=100, n_test=48, image_size=48, seed=0)
    caps = tmp / "same_as_dataset.csv"
    with caps.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        for img_id, texts in ds.captions.items():
            for t in texts:
                w.writerow([img_id, t])
    out = tmp / "run"
    argv = ["ablate", "--config", _config(tmp, tmp / "cache"), "--sources", f"dataset,shuffled,file:{caps}",
            "--out", str(out), "--no-progress"]
    return out, main(argv), argv


@pytest.mark.slow  # one ~20 s ablation run (4 models with a stage-2 epoch), shared by 3 tests
def test_ablate_command_trains_each_source_and_compares_them(ablation_run, capsys):
    out, code, _ = ablation_run
    assert code == 0
    result = json.loads((out / "ablation.json").read_text())
    names = ["llmvem_lambda0", "captions_dataset", "captions_shuffled", "captions_file_same_as_dataset"]
    assert list(result["models"]) == names
    assert result["lambda"] == 0.5 and result["baseline"] == "llmvem_lambda0" and result["warning"] is None
    preds = {n: np.load(out / "models" / n / "predictions_test.npy") for n in names}
    # identical caption texts → identical caption embeddings → exactly the same model (every model starts from
    # the same pretrained backbone: stage 2 fine-tuning must not leak from one model into the next)
    np.testing.assert_array_equal(preds["captions_file_same_as_dataset"], preds["captions_dataset"])
    # the captions matter: shuffled captions and no alignment give other models
    assert np.abs(preds["captions_shuffled"] - preds["captions_dataset"]).max() > 1e-4
    assert np.abs(preds["llmvem_lambda0"] - preds["captions_dataset"]).max() > 1e-4
    # the recorded numbers are those of the saved predictions
    ds = load_dataset("virtual", n_train=100, n_test=48, image_size=48, seed=0)
    y = ds.test.responses
    for n in names:
        assert result["models"][n]["mean_r"] == pytest.approx(float(np.mean(pearson_r(y, preds[n]))), abs=1e-6)
    assert result["models"]["captions_dataset"]["mean_r"] > 0.05  # the model learned something
    for n in names[1:]:
        vs = result["models"][n]["vs_lambda0"]
        assert vs["diff"] == pytest.approx(result["models"][n]["mean_r"] - result["models"]["llmvem_lambda0"]["mean_r"])
        assert vs["ci_low"] <= vs["diff"] <= vs["ci_high"] and 0 < vs["p_value"] <= 1
        assert set(vs["per_roi"]) == set(ds.roi_masks)
    pairs = {(c["a"], c["b"]): c for c in result["pairwise"]}
    assert len(pairs) == 3
    same = pairs[("captions_dataset", "captions_file_same_as_dataset")]
    assert same["diff"] == 0.0 and same["p_value"] == 1.0 and same["fraction_improved"] == 0.0
    shuf = pairs[("captions_dataset", "captions_shuffled")]
    assert shuf["diff"] == pytest.approx(result["models"]["captions_shuffled"]["mean_r"]
                                         - result["models"]["captions_dataset"]["mean_r"])
    assert result["sources"][1]["captions"]["shuffled"] is True
    # table: printed and written, one row per model plus the pairwise block
    table = (out / "ablation.md").read_text()
    assert table == ablation_table(result)
    assert table.count("\n| LLM-VEM λ=0.5, ") == 3 + 3
    assert f"{result['models']['captions_dataset']['mean_r']:.3f}" in table


@pytest.mark.slow
def test_ablate_run_folder_renders_in_the_report(ablation_run):
    out, code, _ = ablation_run
    assert code == 0
    section = json.loads((out / "extra_sections" / "caption_ablation.json").read_text())
    assert section["title"] == "Caption-source ablation" and section["figures"] == ["caption_ablation.png"]
    assert (out / "extra_sections" / "caption_ablation.png").stat().st_size > 5000
    page = (out / "report" / "index.html").read_text()
    assert "Caption-source ablation" in page and "shuffled captions" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert {(c["a"], c["b"]) for c in metrics["comparisons"]} >= {("llmvem_lambda0", "captions_dataset"),
                                                                  ("captions_dataset", "captions_shuffled")}
    # the gallery shows each source's captions of the same test images
    gallery = json.loads((out / "gallery.json").read_text())
    ds = load_dataset("virtual", n_train=100, n_test=48, image_size=48, seed=0)
    for item in gallery:
        assert set(item["captions"]) == {"dataset", "shuffled", "file_same_as_dataset"}
        assert item["captions"]["dataset"] == ds.captions[item["id"]] == item["captions"]["file_same_as_dataset"]
    shuffled_texts = [t for item in gallery for t in item["captions"]["shuffled"]]
    assert sum(t != d for item in gallery for t, d in zip(item["captions"]["shuffled"], item["captions"]["dataset"],
                                                          strict=True)) >= len(shuffled_texts) // 2


@pytest.mark.slow
def test_ablate_resume_reuses_models_and_refuses_a_used_folder(ablation_run, capsys):
    out, code, argv = ablation_run
    assert code == 0
    before = json.loads((out / "ablation.json").read_text())
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    after = json.loads((out / "ablation.json").read_text())
    assert {n: m["mean_r"] for n, m in after["models"].items()} == {n: m["mean_r"] for n, m in before["models"].items()}
    assert "LLM-VEM λ=0.5, dataset captions" in capsys.readouterr().out


def test_ablate_refuses_lambda_zero_and_bad_sources_before_any_work(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "cache")
    assert main(["ablate", "--config", cfg, "--sources", "dataset,shuffled", "--out", str(tmp_path / "a"),
                 "--set", "model.lambda_align=0"]) == 2
    assert "model.lambda_align = 0" in capsys.readouterr().err
    assert main(["ablate", "--config", cfg, "--sources", "dataset,captioner", "--out", str(tmp_path / "b")]) == 2
    assert "unknown kind 'captioner'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "cache").exists()


def test_frozen_backbone_ablation_warns_that_captions_cannot_matter(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    cfg = apply_overrides(load_config(_config(tmp_path, tmp_path / "cache")), ["train.stage2.epochs=0"])
    with pytest.warns(UserWarning, match="stage2.epochs = 0"), pytest.raises(RunFolderError):
        run_ablation(cfg, "dataset,shuffled", used)
    assert (used / "notes.txt").read_text() == "mine"
