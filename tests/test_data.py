"""Data: the embedded digits split, ImageFolder and torchvision loaders, runtime input loading."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from edgeexit.train.data import load_data
from edgeexit.runtime.datasets import DATASETS, digits_split, load_eval_data, load_input, split_indices
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
    x, _ = splits.train.arrays()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert splits.info.input_shape == (1, 16, 16) and splits.info.num_classes == 10


def write_images(root, classes=("cat", "dog"), per_class=6, size=(20, 12), first_level=0):
    """Class folders of RGB PNGs, each a flat gray at its own level (first_level, first_level + 1, ...),
    so a loaded image says which file it was."""
    level = first_level
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size[1], size[0], 3), level, dtype=np.uint8)).save(root / name / f"{i}.png")
            level += 1
    return level


def test_folder_data_trains_side(tmp_path):
    write_images(tmp_path)
    splits = load_data(f"folder:{tmp_path}", input_size=24)
    assert splits.info.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    x, y = splits.train[0]
    assert tuple(x.shape) == (3, 24, 24) and y in (0, 1)


SPEC = InputSpec("input", ("batch", 3, 8, 8), (0.5,) * 3, (0.5,) * 3, ("cat", "dog"))


def levels_training(dataset) -> list[int]:
    """The gray level (file identity) and label of every image of a training split."""
    return sorted((round(float(dataset[i][0][0].mean()) * 127.5 + 127.5), dataset[i][1]) for i in range(len(dataset)))


def levels_runtime(root, split) -> list[int]:
    x, y = load_eval_data(f"folder:{root}", split, SPEC)
    return sorted((round(float(v) * 127.5 + 127.5), int(label)) for v, label in zip(x[:, 0].mean(axis=(1, 2)), y))


def assert_same_split_both_sides(root) -> dict[str, list]:
    """run/calibrate (torch-free) read exactly the images training put in each split, and the splits are disjoint."""
    splits = load_data(f"folder:{root}", input_size=8)
    sides = {}
    for split in ("train", "val", "test"):
        trained = levels_training(getattr(splits, split))
        assert levels_runtime(root, split) == trained, split
        sides[split] = trained
    seen = [level for part in sides.values() for level, _ in part]
    assert len(seen) == len(set(seen)), "an image is in two splits"
    return sides


def test_flat_folder_uses_the_training_split_everywhere(tmp_path):
    write_images(tmp_path, per_class=20)
    sides = assert_same_split_both_sides(tmp_path)
    assert [len(sides[s]) for s in ("train", "val", "test")] == [28, 6, 6]  # seeded 70/15/15 of 40
    with pytest.raises(InputError, match="not one of the classes"):
        load_eval_data(f"folder:{tmp_path}", "test", dataclasses.replace(SPEC, class_names=("a", "b")))


def test_train_val_test_folders_are_each_their_split(tmp_path):
    end = write_images(tmp_path / "train", per_class=5)
    end = write_images(tmp_path / "val", per_class=2, first_level=end)
    write_images(tmp_path / "test", per_class=3, first_level=end)
    sides = assert_same_split_both_sides(tmp_path)
    assert [len(sides[s]) for s in ("train", "val", "test")] == [10, 4, 6]
    assert [level for level, _ in sides["val"]] == list(range(10, 14))


def test_missing_val_is_carved_out_of_train_not_copied(tmp_path):
    end = write_images(tmp_path / "train", per_class=17)
    write_images(tmp_path / "test", per_class=3, first_level=end)
    sides = assert_same_split_both_sides(tmp_path)
    assert [len(sides[s]) for s in ("train", "val", "test")] == [28, 6, 6]  # train/ cut 70/15 (seeded), test/ as is
    assert {level for level, _ in sides["train"] + sides["val"]} == set(range(34))


def test_train_folder_alone_is_split_like_a_flat_folder(tmp_path):
    write_images(tmp_path / "train", per_class=20)
    sides = assert_same_split_both_sides(tmp_path)
    assert [len(sides[s]) for s in ("train", "val", "test")] == [28, 6, 6]


def test_digits_split_is_unchanged_by_the_general_split():
    """The seeded digits split (the one the README's numbers and every trained model used) stays as it was."""
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(split_indices(1797, "val"), np.sort(order[1258:1528]))
    np.testing.assert_array_equal(split_indices(1797, "test"), np.sort(order[1528:]))


TORCHVISION_SETS = sorted(name for name, source in DATASETS.items() if source.needs_torch)


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_torchvision_loaders_on_small_fake_sets(name, tmp_path, fake_torchvision):
    """The real loader code path, with torchvision's class swapped for a tiny in-memory set."""
    calls = fake_torchvision(name)
    channels = DATASETS.get(name).torchvision.channels
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


def test_torchvision_evaluation_uses_the_bundles_channels_and_normalization(tmp_path, fake_torchvision):
    """mnist (1 channel, 28x28) into a 3-channel 16x16 bundle: gray repeated, resized, the bundle's mean/std."""
    fake_torchvision("mnist")
    spec = InputSpec("input", ("batch", 3, 16, 16), (0.2, 0.4, 0.6), (0.5, 0.25, 0.125), tuple("0123456789"))
    x, y = load_eval_data("mnist", "test", spec, str(tmp_path))
    assert x.shape == (20, 3, 16, 16) and y.shape == (20,)
    pixels = x * np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1) + np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1
    np.testing.assert_allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    gray, _ = load_eval_data("mnist", "test", dataclasses.replace(spec, shape=("batch", 1, 16, 16), mean=(0.2,), std=(0.5,)),
                             str(tmp_path))
    np.testing.assert_allclose(gray[:, 0], x[:, 0], atol=1e-5)
