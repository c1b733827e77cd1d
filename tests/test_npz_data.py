"""npz data sets: the seeded split on both sides, the accepted layouts, and one-line errors for bad files."""
import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.train.data import load_data
from edgeexit.runtime.datasets import load_eval_data, load_npz, split_indices
from edgeexit.runtime.manifest import InputSpec
from edgeexit.errors import InputError

CLASSES = np.array(["zero", "one", "two"])


def write_npz(path, n=40, size=12, **arrays):
    """A small 3-class set: class c images have brightness 80 * c, so they are separable."""
    y = np.arange(n) % 3
    x = np.repeat((80 * y).astype(np.uint8)[:, None, None], size, 1).repeat(size, 2)
    np.savez(path, **{"x": x, "y": y, "classes": CLASSES, **arrays})
    return path


def spec(shape=(1, 8, 8), mean=(0.0,), std=(1.0,), classes=CLASSES):
    return InputSpec("input", ("batch", *shape), tuple(mean), tuple(std), tuple(str(c) for c in classes))


def test_training_side_uses_the_digits_split_and_records_normalization(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    splits = load_data(f"npz:{path}", input_size=8)
    assert splits.info.class_names == list(CLASSES) and splits.info.input_shape == (1, 8, 8)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [len(split_indices(40, s)) for s in ("train", "val", "test")]
    x, y = splits.train.arrays()
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.05
    expected = (160 * (y.numpy() == 2) + 80 * (y.numpy() == 1)) / 255.0
    raw = x[:, 0, 0, 0].numpy() * splits.info.std[0] + splits.info.mean[0]
    np.testing.assert_allclose(raw, expected, atol=1e-5)


def test_runtime_side_matches_training_split_and_takes_all(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    splits = load_data(f"npz:{path}", input_size=8)
    info = splits.info
    x, y = load_eval_data(f"npz:{path}", "test", spec(mean=info.mean, std=info.std))
    x_test, y_test = splits.test.arrays()
    np.testing.assert_allclose(x, x_test.numpy(), atol=1e-5)
    np.testing.assert_array_equal(y, y_test.numpy())
    x_all, y_all = load_eval_data(f"npz:{path}", "all", spec())
    assert x_all.shape == (40, 1, 8, 8) and len(y_all) == 40


def test_color_uint8_and_float32_layouts(tmp_path):
    rgb = np.zeros((6, 5, 5, 3), np.uint8)
    rgb[..., 1] = 255
    np.savez(tmp_path / "rgb.npz", x=rgb, y=np.array([0, 1] * 3))
    data = load_npz(tmp_path / "rgb.npz")
    assert data.x.shape == (6, 3, 5, 5) and data.class_names == ["0", "1"]
    np.testing.assert_array_equal(data.x[0, :, 0, 0], [0.0, 1.0, 0.0])
    ready = np.full((6, 1, 4, 4), -0.5, np.float32)
    np.savez(tmp_path / "f.npz", x=ready, y=np.array([0, 1] * 3))
    x, _ = load_eval_data(f"npz:{tmp_path / 'f.npz'}", "all", spec(shape=(3, 4, 4), mean=(0.0,) * 3, std=(1.0,) * 3))
    assert x.shape == (6, 3, 4, 4) and np.all(x == -0.5)  # grayscale repeated into the model's 3 channels


BAD_FILES = {
    "missing y": ({"x": np.zeros((4, 5, 5), np.uint8)}, "no 'y' array"),
    "missing x": ({"y": np.zeros(4, np.int64)}, "no 'x' array"),
    "lengths": ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.zeros(3, np.int64)}, "4 samples but y has 3"),
    "label range": ({"x": np.zeros((3, 5, 5), np.uint8), "y": np.array([0, 1, 5]), "classes": np.array(["a", "b"])},
                    "label 5 .* outside 0..1"),
    "negative label": ({"x": np.zeros((3, 5, 5), np.uint8), "y": np.array([0, -1, 1])}, "label -1"),
    "x dtype": ({"x": np.zeros((4, 5, 5), np.int64), "y": np.zeros(4, np.int64)}, "x is int64"),
    "float rank": ({"x": np.zeros((4, 5, 5), np.float32), "y": np.zeros(4, np.int64)}, r"float32 \(N, C, H, W\)"),
    "y dtype": ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.zeros(4, np.float32)}, "1-D integer label"),
    "nan": ({"x": np.full((2, 1, 5, 5), np.nan, np.float32), "y": np.array([0, 1])}, "NaN or inf"),
    "empty": ({"x": np.zeros((0, 5, 5), np.uint8), "y": np.zeros(0, np.int64)}, "no pixels"),
    "one class": ({"x": np.zeros((2, 5, 5), np.uint8), "y": np.zeros(2, np.int64)}, "only one class"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_npz_files_are_one_line_input_errors(tmp_path, case):
    arrays, message = BAD_FILES[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message) as info:
        load_npz(tmp_path / "bad.npz")
    assert "\n" not in str(info.value)


def test_unreadable_and_absent_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(InputError, match="cannot read .* as an .npz archive"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="not found"):
        load_npz(tmp_path / "absent.npz")


def test_cli_trains_and_runs_on_npz_and_reports_bad_files_in_one_line(tmp_path):
    from conftest import tiny_train

    from edgeexit.export import export_bundle

    path = write_npz(tmp_path / "d.npz", n=90)
    model = tiny_train(tmp_path, data=f"npz:{path}", epochs=1)
    export_bundle(model, tmp_path / "bundle")
    runner = CliRunner()
    ok = runner.invoke(main, ["run", str(tmp_path / "bundle"), "--data", f"npz:{path}", "--split", "all"])
    assert ok.exit_code == 0, ok.output
    assert "accuracy" in ok.output
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 12, 12), np.uint8), y=np.array([0, 1, 7]))
    bad = runner.invoke(main, ["run", str(tmp_path / "bundle"), "--data", f"npz:{tmp_path / 'bad.npz'}", "--split", "all"])
    assert bad.exit_code == 4 and bad.output.strip().count("\n") == 0 and "outside the bundle's 3 classes" in bad.output
    for command in (["calibrate", str(tmp_path / "bundle"), "--target-drop", "1"], ["bench", str(tmp_path / "bundle"), "--limit", "4"]):
        result = runner.invoke(main, [*command, "--data", f"npz:{tmp_path / 'absent.npz'}"])
        assert result.exit_code == 4 and "not found" in result.output, result.output
