"""Serving inputs: every malformed request gets an InputError naming the field,
what was expected and what was found (the rows of docs/bad_input.md)."""

from __future__ import annotations

import numpy as np
import pytest

from metatransfer.serving.inputs import InputError, as_images, as_labels


def images(n: int = 2, c: int = 1, s: int = 28, dtype=np.float32) -> np.ndarray:
    return np.full((n, c, s, s), 0.5, dtype=dtype)


def test_good_images_and_labels_pass_unchanged() -> None:
    x = as_images(images(3), "images", 1, 28)
    assert x.shape == (3, 1, 28, 28) and float(x[0, 0, 0, 0]) == 0.5
    y, n = as_labels([0, 1, 1, 0, 2], "support_y", 5)
    assert n == 3 and y.tolist() == [0, 1, 1, 0, 2]


@pytest.mark.parametrize("value, expected", [
    (images(2, 3), r"images: expected float32 images of shape \(batch, 1, 28, 28\), found shape \(2, 3, 28, 28\)"),
    (images(2, 1, 32), r"found shape \(2, 1, 32, 32\)"),
    (np.zeros((28, 28), np.float32), r"found shape \(28, 28\)"),
    (np.zeros((0, 1, 28, 28), np.float32), r"found shape \(0, 1, 28, 28\)"),
    (images(dtype=np.uint8), r"images: expected float32 values in \[0, 1\], found dtype uint8"),
    (images() * np.nan, r"images: contains NaN or infinite values"),
    (images() * 255, r"images: values must be in \[0, 1\] \(pixel / 255\), found range \[128, 128\]"),
])
def test_bad_images_are_named(value, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        as_images(value, "images", 1, 28)


@pytest.mark.parametrize("value, expected", [
    ([0, 1, 1], r"support_y: expected 4 labels \(one per support image\), found 3"),
    ([0.0, 1.0, 0.0, 1.0], r"support_y: expected integer labels, found dtype float64"),
    ([0, 2, 0, 2], r"labels must be 0..N-1 with every class present and N >= 2, found \[0, 2\]"),
    ([1, 1, 1, 1], r"found \[1\]"),
])
def test_bad_labels_are_named(value, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        as_labels(value, "support_y", 4)


def test_many_bad_labels_are_quoted_as_a_short_prefix() -> None:
    with pytest.raises(InputError) as err:
        as_labels(list(range(1, 5001)), "support_y", 5000)
    assert str(err.value).endswith("found [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...] (5000 distinct labels)")
    assert len(str(err.value)) < 200



# --------------------------------------------------------------------------- the target model's answer
def _served_target_model(tmp_path, class_names: list[str]):
    """The pyfunc of a tiny saved target model, loaded as the scoring server loads it."""
    import torch

    from metatransfer.models import BackboneSpec
    from metatransfer.serving.target_model import TargetModelPredictor
    from metatransfer.training.finetune import TargetModel, save_target_model

    torch.manual_seed(0)
    model = TargetModel(BackboneSpec(name="conv4", in_channels=3, image_size=16, hidden=4), class_names, "protonet")
    save_target_model(model, tmp_path / "model")
    return TargetModelPredictor(tmp_path / "model")


def test_target_model_answers_with_class_names(tmp_path) -> None:
    names = ["brain_tumor_mri/glioma", "brain_tumor_mri/meningioma", "brain_tumor_mri/notumor",
             "brain_tumor_mri/pituitary"]
    pyfunc = _served_target_model(tmp_path, names)
    x = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32)
    out = pyfunc.predict(x)
    # today's fields, unchanged
    assert {"prediction", "label", "prob_0", "prob_1", "prob_2", "prob_3"} <= set(out.columns)
    probs = out[[f"prob_{i}" for i in range(4)]].to_numpy()
    assert out["prediction"].tolist() == probs.argmax(1).tolist()
    assert out["label"].tolist() == [names[i] for i in out["prediction"]]
    # the names a person reads: no dataset prefix, probabilities keyed by them
    short = ["glioma", "meningioma", "notumor", "pituitary"]
    assert out["class_name"].tolist() == [short[i] for i in out["prediction"]]
    for row, p in zip(out["probabilities"], probs):
        assert list(row) == short
        np.testing.assert_allclose(list(row.values()), p, atol=1e-12)
    # JSON as the scoring server writes it: the dict column is an object keyed by class name
    import io
    import json

    from mlflow.pyfunc.scoring_server import predictions_to_json

    buf = io.StringIO()
    predictions_to_json(out, buf)
    first = json.loads(buf.getvalue())["predictions"][0]
    assert first["class_name"] in short and set(first["probabilities"]) == set(short)


def test_target_model_keeps_full_names_when_short_ones_collide(tmp_path) -> None:
    pyfunc = _served_target_model(tmp_path, ["a/cat", "b/cat"])
    out = pyfunc.predict(np.zeros((2, 3, 16, 16), dtype=np.float32))
    assert set(out["probabilities"][0]) == {"a/cat", "b/cat"} and out["class_name"][0] in {"a/cat", "b/cat"}


def test_display_names() -> None:
    from metatransfer.classnames import display_name, display_names

    assert display_name("breastmnist/normal, benign") == "normal, benign"
    assert display_name("omniglot/Greek/character01") == "Greek/character01"
    assert display_name("omniglot/Greek/character01", "omniglot") == "Greek/character01"
    assert display_name("mini_imagenet/n01532829", "other") == "mini_imagenet/n01532829"
    assert display_name("glioma") == "glioma" and display_name("x/") == "x/"
    assert display_names(["retinamnist/0", "retinamnist/1"]) == ["0", "1"]
    assert display_names(["a/cat", "b/cat", "b/dog"]) == ["a/cat", "b/cat", "b/dog"]
