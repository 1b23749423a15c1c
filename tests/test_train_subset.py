"""llmvem.data.splits.train_subset: the training images of a learning-curve point, nested in n, seeded, with
validation and test untouched."""

from __future__ import annotations

import numpy as np
import pytest
from test_train_trainer import make_dataset

from llmvem.data.splits import train_subset
from llmvem.errors import DataValidationError


def test_subsets_are_nested_seeded_and_leave_val_and_test_alone():
    ds, _ = make_dataset(n_train=40)
    small, large = train_subset(ds, 10), train_subset(ds, 25)
    ids_small, ids_large = small.train.images.ids, large.train.images.ids
    assert len(ids_small) == 10 and len(ids_large) == 25 and set(ids_small) <= set(ids_large)  # nested
    rows = [ds.train.images.ids.index(i) for i in ids_small]
    assert rows == sorted(rows)  # the original order is kept
    np.testing.assert_array_equal(small.train.responses, ds.train.responses[rows])
    assert small.val is ds.val and small.test is ds.test
    assert small.meta["train_subset"] == {"n_train": 10, "of": 40, "seed": 0}
    assert train_subset(ds, 10).train.images.ids == ids_small  # the same seed, the same images
    assert train_subset(ds, 10, seed=1).train.images.ids != ids_small
    assert train_subset(ds, 40) is ds and train_subset(ds, 100) is ds
    with pytest.raises(DataValidationError, match="at least 1"):
        train_subset(ds, 0)
