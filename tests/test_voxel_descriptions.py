"""Voxel descriptions: vocabularies, ranking arithmetic, category agreement, and the check on the virtual brain
(the top-ranked category phrase of a semantic voxel names its true preferred category)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_text_to_brain import MODEL, _fit_synthetic, run_dir  # noqa: F401  (run_dir is a fixture)

from llmvem.data.virtual_brain import CATEGORIES, COLOURS
from llmvem.errors import DataValidationError
from llmvem.explain.text_to_brain import TextToBrain
from llmvem.explain.voxel_descriptions import (
    VOCABULARY_FILE,
    VoxelDescriptions,
    caption_corpus,
    category_agreement,
    category_phrases,
    default_vocabulary,
    describe_voxels,
    read_vocabulary,
    virtual_brain_vocabulary,
    write_vocabulary,
)


# --------------------------------------------------------------------------------------------- vocabularies
def test_virtual_brain_vocabulary_covers_categories_colours_sizes_and_backgrounds():
    vocab = virtual_brain_vocabulary()
    n_cat, n_col = len(CATEGORIES), len(COLOURS)
    assert len(vocab) == len(set(vocab)) == n_cat + n_cat * n_col + 2 * n_cat * n_col + 5 + 5 * n_col
    assert vocab[:n_cat] == category_phrases(CATEGORIES) == ["a circle", "a square", "a triangle", "a star",
                                                             "a cross"]
    for phrase in ("an orange star", "a large red circle", "a small white cross", "a striped background",
                   "a green checkered background"):
        assert phrase in vocab
    assert not any(p.startswith("a orange") for p in vocab)


def test_default_vocabulary_is_generated_for_the_virtual_brain_and_the_captions_otherwise():
    meta = {"ground_truth": {"categories": ("circle", "star"), "colours": ("red",)}}
    phrases, source = default_vocabulary(meta, None)
    assert phrases[:2] == ["a circle", "a star"] and "a large red star" in phrases and "generated" in source
    phrases, source = default_vocabulary({}, [["A dog.", "A  dog\nruns."], ["A dog."]])
    assert phrases == ["A dog.", "A dog runs."] and source == "2 unique training captions"
    with pytest.raises(DataValidationError, match="no vocabulary"):
        default_vocabulary({}, [])


def test_caption_corpus_is_unique_and_a_seeded_subset_when_large():
    caps = [[f"caption {i % 50}"] for i in range(200)]
    assert caption_corpus(caps) == [f"caption {i}" for i in range(50)]
    a, b = caption_corpus(caps, max_phrases=10, seed=3), caption_corpus(caps, max_phrases=10, seed=3)
    assert a == b and len(set(a)) == 10 and caption_corpus(caps, max_phrases=10, seed=4) != a


def test_vocabulary_file_roundtrip_and_errors(tmp_path):
    path = write_vocabulary(tmp_path / "v.txt", ["a dog", "a cat"], header="two animals")
    (tmp_path / "v.txt").write_text(path.read_text() + "\n# comment\n  a dog  \n\na bird\n", encoding="utf-8")
    assert read_vocabulary(path) == ["a dog", "a cat", "a bird"]
    with pytest.raises(DataValidationError, match="not found"):
        read_vocabulary(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataValidationError, match=r"empty.txt: phrases: the file holds no phrase"):
        read_vocabulary(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match="not UTF-8"):
        read_vocabulary(tmp_path / "latin1.txt")
    with pytest.raises(DataValidationError, match="single lines"):
        write_vocabulary(tmp_path / "bad.txt", ["two\nlines"])


# ------------------------------------------------------------------------------------------- ranking maths
def test_rankings_per_voxel_and_per_roi():
    scores = np.array([[1.0, 0.0, 5.0, 2.0],
                       [3.0, 0.0, 4.0, 2.0],
                       [2.0, 0.0, 6.0, 2.0]], dtype=np.float32)  # voxel 1 and 3 are flat
    d = VoxelDescriptions(["p0", "p1", "p2"], scores, "text")
    assert d.top_for_voxel(0, 2) == [("p1", 3.0), ("p2", 2.0)]
    assert d.best_phrase_index().tolist() == [1, 0, 2, 0]
    assert d.top_indices(2).tolist()[0] == [1, 2] and d.top_indices(2).tolist()[2] == [2, 0]
    assert d.top_indices(9).shape == (4, 3)
    z = d.standardized()
    np.testing.assert_allclose(z[:, 0], (scores[:, 0] - 2.0) / np.std([1.0, 3.0, 2.0]), rtol=1e-6)
    np.testing.assert_array_equal(z[:, 1], 0.0)  # a flat voxel contributes nothing
    roi = np.array([True, True, True, False])
    np.testing.assert_allclose(d.roi_scores(roi), z[:, :3].mean(axis=1), rtol=1e-6)
    # z of voxel 0: p0 -1.22, p1 +1.22, p2 0; of voxel 2: p0 0, p1 -1.22, p2 +1.22; voxel 1 adds 0
    top = d.top_for_roi(roi, 3)
    assert [p for p, _ in top] == ["p2", "p1", "p0"]
    assert [s for _, s in top] == pytest.approx([np.sqrt(1.5) / 3, 0.0, -np.sqrt(1.5) / 3], abs=1e-6)
    with pytest.raises(DataValidationError, match="no voxel"):
        d.roi_scores(np.zeros(4, bool))
    with pytest.raises(DataValidationError, match=r"0\.\.3"):
        d.top_for_voxel(4)


def test_category_agreement_counts_matches_and_confusions():
    cats = ["circle", "star", "cross"]
    phrases = ["a star", "a circle", "a blue thing", "a cross"]
    # 5 voxels: preferred circle, circle, star, cross, none; top category: circle, star, star, cross, circle
    scores = np.array([[0, 2, 3, 0, 0],     # a star
                       [3, 1, 1, 0, 5],     # a circle
                       [9, 9, 9, 9, 9],     # not a category phrase: ignored
                       [1, 0, 2, 4, 0]], dtype=np.float32)
    d = VoxelDescriptions(phrases, scores, "aligned")
    agr = category_agreement(d, np.array([0, 0, 1, 2, -1]), cats)
    assert agr["n_voxels"] == 4 and agr["fraction"] == pytest.approx(0.75) and agr["chance"] == pytest.approx(1 / 3)
    assert agr["top_category"].tolist() == [0, 1, 1, 2, 0]
    assert agr["confusion"].tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(DataValidationError, match="lacks the category phrases"):
        category_agreement(d, np.zeros(5, int), ["circle", "square"])


def test_describe_voxels_uses_the_readout_predictions():
    t2b, A, T, Y = _fit_synthetic()
    emb = T["test"][:7]
    phrases = [f"p{i}" for i in range(7)]
    for readout in ("aligned", "text"):
        d = describe_voxels(t2b, phrases, readout=readout, embeddings=emb)
        np.testing.assert_array_equal(d.scores, t2b.predict(emb, readout))
        assert d.readout == readout
    with pytest.raises(DataValidationError, match="6 rows for 7 phrases"):
        describe_voxels(t2b, phrases, embeddings=emb[:6])


# -------------------------------------------------------------------------------- virtual brain (slow)
@pytest.mark.slow
def test_semantic_voxels_are_described_by_their_preferred_category(run_dir):  # noqa: F811
    """The acceptance check of the issue: for semantic voxels, the top-ranked of the category phrases
    ("a circle", "a square", ...) is the preferred category for a clear majority (chance 20%)."""
    import llmvem.inputs

    model_dir = run_dir / "models" / MODEL
    t2b = TextToBrain.load(model_dir)
    from llmvem.config import load_config

    ds = llmvem.inputs.load_config_dataset(load_config(model_dir / "config.yaml"))
    preferred = ds.meta["ground_truth"]["preferred_category"]
    encoder = t2b.load_encoder("cpu")
    cat_phr = category_phrases(CATEGORIES)
    emb = t2b.encode(cat_phr, encoder)
    fractions = {}
    for readout in ("aligned", "text"):
        agr = category_agreement(describe_voxels(t2b, cat_phr, readout=readout, embeddings=emb), preferred,
                                 CATEGORIES)
        fractions[readout] = agr["fraction"]
        assert agr["n_voxels"] == 60
        assert agr["fraction"] >= 0.7, agr["confusion"]  # clear majority, chance is 0.2
    print("category agreement of semantic voxels:", fractions)
    # Over the whole generated vocabulary, a semantic voxel's top phrase names its preferred category.
    vocab = read_vocabulary(model_dir / VOCABULARY_FILE)
    assert vocab == virtual_brain_vocabulary()
    d = describe_voxels(t2b, vocab, readout="aligned", encoder=encoder)
    semantic = np.flatnonzero(preferred >= 0)
    names = [CATEGORIES[preferred[v]] in vocab[d.best_phrase_index()[v]] for v in semantic]
    assert np.mean(names) >= 0.6
    # Each semantic_<category> ROI's top phrase names that category.
    for cat in CATEGORIES:
        top_phrase = d.top_for_roi(ds.roi_masks[f"semantic_{cat}"], 1)[0][0]
        assert cat in top_phrase, (cat, top_phrase)


@pytest.mark.slow
def test_report_section_and_per_voxel_file(run_dir):  # noqa: F811
    section = json.loads((run_dir / "extra_sections" / "voxel_descriptions.json").read_text())
    assert section["title"] == "Voxel descriptions"
    assert section["figures"] == ["voxel_descriptions_categories.png"]
    text = json.dumps(section["blocks"])  # data blocks, rendered escaped by the report
    assert "chance 20%" in text and "semantic_circle" in text
    assert "BrainSCUBA" in text
    kept = json.loads((run_dir / "models" / MODEL / "voxel_descriptions.json").read_text())
    top = np.asarray(kept["per_voxel_top_index"]["aligned"])
    assert top.shape == (100, 5) and len(kept["phrases"]) == kept["n_phrases"] == 150
    assert kept["category_agreement"]["aligned"] >= 0.7
    assert kept["per_roi"]["aligned"]["semantic_star"][0][0].endswith("star")
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "voxel_descriptions_categories.png" in page
