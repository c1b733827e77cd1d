"""Data: the embedded digits split, ImageFolder and torchvision loaders, runtime input loading."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from edgeexit.train.data import TORCHVISION_SETS, load_data
from edgeexit.runtime.datasets import digits_split, load_eval_data, load_input, split_indices
from edgeexit.errors import ConfigError, InputError
from edgeexit.runtime.manifest import InputSpec


def test_digits_split_is_fixed_disjoint_and_complete():
    parts = [split_indices(1797, s) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 1797
    assert len(np.unique(np.concatenate(parts))) == 1797
    np.testing.assert_array_equal(parts[2], split_indices(1797, "test"))
    x, y = digits_split("test", (1, 32, 32))
    assert x.shape == (len(parts[2]), 1, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))


def test_digits_training_data_records_normalization():
    splits = load_data("digits", input_size=16)
    x, _ = splits.train.tensors
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert splits.info.input_shape == (1, 16, 16) and splits.info.num_classes == 10


def write_images(root, classes=("cat", "dog"), per_class=6, size=(20, 12)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_folder_data_trains_side(tmp_path):
    write_images(tmp_path)
    splits = load_data(f"folder:{tmp_path}", input_size=24)
    assert splits.info.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    x, y = splits.train[0]
    assert tuple(x.shape) == (3, 24, 24) and y in (0, 1)


def test_folder_data_runtime_side_matches_class_names(tmp_path):
    write_images(tmp_path)
    spec = InputSpec("input", ("batch", 3, 8, 8), (0.5,) * 3, (0.5,) * 3, ("cat", "dog"))
    x, y = load_eval_data(f"folder:{tmp_path}", "test", spec)
    assert x.shape == (12, 3, 8, 8) and sorted(set(y.tolist())) == [0, 1]
    with pytest.raises(InputError, match="not one of the bundle's classes"):
        load_eval_data(f"folder:{tmp_path}", "test", dataclasses.replace(spec, class_names=("a", "b")))


@pytest.mark.parametrize("name", sorted(TORCHVISION_SETS))
def test_torchvision_loaders_on_small_fake_sets(name, tmp_path, fake_torchvision):
    """The real loader code path, with torchvision's class swapped for a tiny in-memory set."""
    calls = fake_torchvision(name)
    channels = TORCHVISION_SETS[name][1]
    splits = load_data(name, data_dir=str(tmp_path), input_size=16)
    assert len(splits.train) == 18 and len(splits.val) == 2 and len(splits.test) == 20
    x, _ = splits.train[0]
    assert tuple(x.shape) == (channels, 16, 16)
    assert all(call[0] == str(tmp_path) and call[3] is False for call in calls)


def test_torchvision_set_needs_data_dir_and_unknown_sets_are_named():
    with pytest.raises(ConfigError, match="--data-dir"):
        load_data("cifar10")
    with pytest.raises(ConfigError, match="choose from: digits"):
        load_data("imagenet")


def test_load_input_npy_image_and_folder(tmp_path):
    spec = InputSpec("input", ("batch", 1, 8, 8), (0.5,), (0.25,), ("0", "1"))
    ready = np.zeros((3, 1, 8, 8), np.float32)
    np.save(tmp_path / "ready.npy", ready)
    x, names = load_input(tmp_path / "ready.npy", spec)
    np.testing.assert_array_equal(x, ready)
    raw = np.full((2, 16, 16), 255, np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    x, _ = load_input(tmp_path / "raw.npy", spec)
    np.testing.assert_allclose(x, 2.0, atol=1e-5)  # (1.0 - 0.5) / 0.25
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.png")
    x, names = load_input(tmp_path / "a.png", spec)
    assert x.shape == (1, 1, 8, 8) and names == ["a.png"]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_input(tmp_path / "bad.png", spec)
