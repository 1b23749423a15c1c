"""The offline EfficientNet-Lite0 label captioner."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_shared
from PIL import Image

from llmvem.captions.labels import LabelCaptioner, imagenet_categories, labels_sentence


def test_sentence_articles_and_lists():
    assert labels_sentence(["ostrich", "emu", "crane"]) == \
        "A photo that looks like an ostrich, or possibly an emu or a crane."
    assert labels_sentence(["zebra"]) == "A photo that looks like a zebra."
    assert labels_sentence(["tench", "European fire salamander"]) == \
        "A photo that looks like a tench, or possibly a European fire salamander."
    assert labels_sentence(["a", "b", "c", "d"]) == "A photo that looks like an a, or possibly a b, a c or a d."
    with pytest.raises(ValueError):
        labels_sentence([])


def test_imagenet_categories_without_importing_torchvision():
    cats = imagenet_categories()
    assert len(cats) == 1000
    assert (cats[0], cats[9], cats[340]) == ("tench", "ostrich", "zebra")


def test_settings_and_batch_shape():
    cap = LabelCaptioner(top_k=2, device="cpu")
    assert cap.settings()["mean"] == [0.5, 0.5, 0.5] and cap.settings()["top_k"] == 2
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    first = cap.caption(imgs, ["a", "b", "c"])
    assert [len(c) for c in first] == [1, 1, 1]
    assert all(c[0].startswith("A photo that looks like ") and c[0].endswith(".") for c in first)
    assert cap.caption(imgs[::-1], ["c", "b", "a"]) == first[::-1]  # deterministic, batch-order independent
    assert LabelCaptioner(top_k=3).config_hash != cap.config_hash


@pytest.mark.shared_data
def test_ostrich_is_a_bird():
    from scipy.io import loadmat

    mat = needs_shared("kriegeskorte92", "Kriegeskorte_Neuron2008_supplementalData.mat")
    stimuli = loadmat(mat)["stimuli_92objs"][0]
    images = [Image.fromarray(np.asarray(s["image"], dtype=np.uint8)) for s in stimuli]
    ostrich = images[29]  # stimulus 30 of the 92 is the ostrich (checked by eye on a contact sheet)
    cap = LabelCaptioner(top_k=3)
    sentence = cap.caption([ostrich])[0][0]
    assert sentence.startswith("A photo that looks like an ostrich")
    birds = {"ostrich", "stork", "limpkin", "crane", "bustard", "emu", "heron", "bird"}
    assert any(word in sentence for word in birds)
    probs, idx = cap.classify(images[24:36])  # the non-human body set: armadillo, camel, ..., ostrich, ...
    cats = imagenet_categories()
    top1 = [cats[i] for i in idx[:, 0]]
    assert top1[29 - 24] == "ostrich" and probs[29 - 24, 0] > 0.4
    # sanity on other animals of the set: a zebra and a camel are recognised
    assert "zebra" in top1 and "Arabian camel" in top1
