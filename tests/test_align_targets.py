"""Non-language alignment targets (``model.align_target``): the virtual brain's attribute vectors carry exactly
what its descriptions say, their embeddings and ids, and the user's path trains toward them (brain and stream)."""

from __future__ import annotations

import numpy as np
import pytest
from test_align_stream_path import _config_file

from llmvem.config import apply_overrides, load_config
from llmvem.data.captioned import load_captioned_images
from llmvem.data.virtual_brain import ATTRIBUTE_NAMES, make_virtual_scenes
from llmvem.embed.targets import attribute_embeddings, attribute_ids, class_embeddings
from llmvem.embed.text import caption_ids
from llmvem.errors import DataValidationError
from llmvem.estimators import LLMVEMEncoder
from llmvem.inputs import PreparedInputs, alignment_targets, prepare_inputs, shuffle_permutations
from llmvem.train.stream import load_align_stream


def test_attribute_vectors_say_exactly_what_the_descriptions_say():
    _, descriptions, scenes = make_virtual_scenes(600, image_size=16, seed=3)
    attrs = np.stack([s.attribute_vector() for s in scenes])
    assert attrs.shape == (600, len(ATTRIBUTE_NAMES)) and set(np.unique(attrs)) <= {0.0, 1.0}
    by_text: dict[str, set[bytes]] = {}
    by_attr: dict[bytes, set[str]] = {}
    for d, a in zip(descriptions, attrs, strict=True):
        by_text.setdefault(d, set()).add(a.tobytes())
        by_attr.setdefault(a.tobytes(), set()).add(d)
    assert all(len(v) == 1 for v in by_text.values()) and all(len(v) == 1 for v in by_attr.values())
    # ids: equal vectors share one, and so do equal captions
    assert len(set(attribute_ids(attrs).tolist())) == len(by_attr) == len(set(caption_ids(descriptions).tolist()))


def test_target_embeddings_are_fixed_unit_vectors_of_the_caption_size():
    rng = np.random.default_rng(0)
    attrs = rng.integers(0, 2, (50, 20)).astype(float)
    attrs[7] = attrs[3]
    emb = attribute_embeddings(attrs, 64)
    assert emb.shape == (50, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb, attribute_embeddings(attrs, 64))  # no data-dependent fit
    np.testing.assert_array_equal(emb[3], emb[7])
    # the projection keeps the attributes' geometry: cosine of embeddings tracks cosine of attribute vectors
    unit = attrs / np.linalg.norm(attrs, axis=1, keepdims=True)
    iu = np.triu_indices(50, 1)
    assert np.corrcoef((unit @ unit.T)[iu], (emb @ emb.T)[iu])[0, 1] > 0.8
    codes = class_embeddings(np.array([5, 9, 5]), 256)
    np.testing.assert_array_equal(codes[0], codes[2])
    assert abs(float(codes[0] @ codes[1])) < 0.3  # distinct classes: near-orthogonal codes (a one-hot, rotated)


@pytest.mark.slow  # ~15 s: a 60-image virtual brain, MiniLM, a random ResNet's features, three short fits
def test_the_user_path_aligns_to_attributes_and_classes(tmp_path):
    cfg = load_config(_config_file(tmp_path, tmp_path / "cache"))
    inputs = prepare_inputs(cfg, show_progress=False)
    ds, dim = inputs.dataset, inputs.text_embeddings["train"].shape[1]
    emb, ids = alignment_targets(apply_overrides(cfg, ["model.align_target=attributes"]), inputs)
    truth = {s: np.stack([ds.meta["attributes"]["by_id"][i] for i in ds.splits[s].images.ids]) for s in ds.splits}
    for s in ds.splits:
        np.testing.assert_array_equal(emb[s], attribute_embeddings(truth[s], dim))
        np.testing.assert_array_equal(ids[s], attribute_ids(truth[s]))
    cap_emb, cap_ids = alignment_targets(cfg, inputs)  # captions: the text embeddings, ids from the texts
    np.testing.assert_array_equal(cap_emb["train"], inputs.text_embeddings["train"])
    np.testing.assert_array_equal(cap_ids["train"], caption_ids(inputs.captions["train"]))
    cls_emb, _ = alignment_targets(apply_overrides(cfg, ["model.align_target=classes"]), inputs)
    assert cls_emb["test"].shape == (len(ds.test), dim)
    # captions.shuffle permutes the attributes exactly as the captions
    shuf = apply_overrides(cfg, ["model.align_target=attributes", "captions.shuffle=true"])
    perms = shuffle_permutations({s: len(ds.splits[s]) for s in ds.splits}, shuf.captions.shuffle_seed)
    s_emb, _ = alignment_targets(shuf, inputs)
    np.testing.assert_array_equal(s_emb["val"], attribute_embeddings(truth["val"][perms["val"]], dim))
    # without attribute vectors the error names the field and the alternative
    bare = PreparedInputs(ds.__class__(ds.name, ds.splits), inputs.captions, {}, inputs.text_embeddings,
                          inputs.backbone, inputs.features)
    with pytest.raises(DataValidationError, match="meta.attributes.*align_target=classes"):
        alignment_targets(apply_overrides(cfg, ["model.align_target=attributes"]), bare)
    # the stream of virtual scenes gets its scenes' attribute embeddings
    streamed = apply_overrides(cfg, ["model.align_target=attributes", "align_data.spec=virtual-scenes:n=30,seed=4"])
    stream = load_align_stream(streamed, inputs.backbone, show_progress=False)
    scenes = load_captioned_images("virtual-scenes:n=30,seed=4", image_size=cfg.data.image_size)
    np.testing.assert_array_equal(stream.text_embeddings, attribute_embeddings(scenes.attributes, dim))
    assert stream.describe()["target"] == "attributes"
    # and a model trains toward them: same core, other target, other predictions
    preds = {}
    for target in ("captions", "attributes"):
        c = apply_overrides(cfg, [f"model.align_target={target}", "align_data.spec=virtual-scenes:n=30,seed=4"])
        enc = LLMVEMEncoder(c, show_progress=False).fit_inputs(inputs)
        assert enc.align_stream_["target"] == target
        preds[target] = enc.predict_inputs(inputs)["test"]
    assert np.abs(preds["captions"] - preds["attributes"]).max() > 1e-4
