"""Training recipes: augmentation of the training split only, flips only where labels survive them, label smoothing,
the optimizers and EENets' mixed schedule, all recorded in model.pt and shown by `edgeexit info`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from edgeexit.cli import main
from edgeexit.errors import ConfigError
from edgeexit.train.augment import AUGMENT_FROM_EPOCHS, AUGMENT_MEASURED_IMAGES, augment_from_epochs, default_augment, resolve_flip
from edgeexit.train.config import SGD_FROM_IMAGES, TrainSpec, default_optimizer
from edgeexit.train.data import training_splits
from edgeexit.train.trainer import epoch_loss, smoothing_term


def epoch_of(dataset) -> torch.Tensor:
    """Every image of a dataset in order, as one epoch of an unshuffled loader delivers them."""
    return torch.cat([x for x, _ in DataLoader(dataset, batch_size=256)])


@pytest.mark.parametrize("augment", ["basic", "trivial"])
def test_training_split_changes_between_epochs_val_and_test_never(augment):
    splits, spec = training_splits(TrainSpec(input_size=16, augment=augment))
    assert spec.augment == augment and spec.flip is False  # digits: no flips
    first, second = epoch_of(splits.training_set()), epoch_of(splits.training_set())
    plain = epoch_of(splits.train)
    changed = (first != second).flatten(1).any(1).float().mean()
    assert changed > 0.5, f"only {changed:.0%} of the training images were drawn anew"
    assert not torch.equal(first, plain)
    for split in (splits.val, splits.test):
        assert torch.equal(epoch_of(split), epoch_of(split))
    none, _ = training_splits(TrainSpec(input_size=16, augment="none"))
    assert torch.equal(epoch_of(none.val), epoch_of(splits.val)) and torch.equal(epoch_of(none.training_set()), plain)


def test_basic_crops_keep_the_image_and_normalization():
    """A padded crop shifts the image by at most the padding: the centre pixels of a shifted digit survive."""
    splits, _ = training_splits(TrainSpec(input_size=32, augment="basic"))
    crop = splits.augment.transforms[0]
    assert crop.padding == [4, 4, 4, 4] and len(splits.augment.transforms) == 1  # 1/8 of 32 px; no flip on digits
    x = epoch_of(splits.training_set())
    assert abs(float(x.mean()) - float(epoch_of(splits.train).mean())) < 0.1  # still normalized by the split's stats


def test_flips_follow_the_data_sets_entry_and_are_refused_for_glyphs():
    assert resolve_flip("digits", None) is False and resolve_flip("fashionmnist", None) is True
    assert resolve_flip("folder:/x", None) is True and resolve_flip("folder:/x", False) is False
    assert resolve_flip("npz:/x.npz", None) is False and resolve_flip("npz:/x.npz", True) is True
    for glyphs in ("digits", "mnist", "svhn"):
        with pytest.raises(ConfigError, match=f"data set '{glyphs}' is not of the same class"):
            resolve_flip(glyphs, True)


def test_flip_for_digits_is_a_one_line_error_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["train", "--augment", "basic", "--flip", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --flip") and "digits" in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_default_augmentation_follows_the_measured_rule(tmp_path):
    """Long schedules augment (6,000 images, 30 epochs: +2.6 points), short ones do not (4 epochs: -3.0), a large set
    (42,000 images: -0.3 at 15 epochs) only later; model.pt says which ran."""
    small, large = AUGMENT_MEASURED_IMAGES, 42000
    assert default_augment(30, small) == "basic" and default_augment(4, small) == "none"
    assert default_augment(AUGMENT_FROM_EPOCHS, small) == "basic" and default_augment(AUGMENT_FROM_EPOCHS - 1, small) == "none"
    assert default_augment(AUGMENT_FROM_EPOCHS, 500) == "basic"  # smaller sets keep the measured break-even
    assert default_augment(15, large) == "none" and default_augment(augment_from_epochs(large), large) == "basic"
    assert AUGMENT_FROM_EPOCHS < augment_from_epochs(large) <= 45
    assert training_splits(TrainSpec(input_size=8, epochs=AUGMENT_FROM_EPOCHS))[1].augment == "basic"  # digits: ~1,000
    assert training_splits(TrainSpec(input_size=8, epochs=3))[0].augment is None


def test_default_optimizer_follows_the_measured_rule():
    """adamw below SGD_FROM_IMAGES training images (digits: +1.5 points over sgd), the papers' sgd from there on
    (42,000 Fashion-MNIST images: +0.8); the lr and the heads' lr follow the optimizer chosen; an explicit choice wins."""
    assert default_optimizer(SGD_FROM_IMAGES) == "sgd" and default_optimizer(SGD_FROM_IMAGES - 1) == "adamw"
    assert default_optimizer(42000) == "sgd" and default_optimizer(1258) == "adamw"
    assert TrainSpec().optimizer is None  # `train` has no fixed default; `pretrain` keeps the papers' sgd
    with pytest.raises(ValueError, match="with_optimizer"):
        TrainSpec().learning_rate
    small, large = TrainSpec().with_optimizer(1258, head_lr_scale=1 / 3), TrainSpec().with_optimizer(42000)
    assert (small.optimizer, small.lr, small.head_lr) == ("adamw", 3e-3, pytest.approx(1e-3))
    assert (large.optimizer, large.lr, large.head_lr) == ("sgd", 0.05, 0.05)
    mine = TrainSpec(optimizer="adamw", lr=0.01, head_lr=0.002).with_optimizer(42000, head_lr_scale=1 / 3)
    assert (mine.optimizer, mine.lr, mine.head_lr) == ("adamw", 0.01, 0.002)
    assert mine.with_optimizer(10) == mine  # resolving twice changes nothing


def test_train_records_the_optimizer_it_chose(tiny_model_path):
    """digits (1,258 training images) trains with adamw, eenet's heads at a third of its rate; model.pt says so."""
    from edgeexit.train.models import read_checkpoint

    spec = read_checkpoint(tiny_model_path)["extra"]["train"]
    assert (spec["optimizer"], spec["lr"]) == ("adamw", 3e-3) and spec["head_lr"] == pytest.approx(1e-3)


def test_label_smoothing_term_is_the_smoothed_cross_entropy():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    exits = [(torch.randn(8, 5), torch.randn(8, 1))]
    plain = torch.nn.functional.cross_entropy
    term = smoothing_term("v4", exits, logits, labels, [("logits", "confidence_logit")], 0.2)
    want = sum(plain(l, labels, label_smoothing=0.2) - plain(l, labels) for l in (logits, exits[0][0]))
    torch.testing.assert_close(term, want)
    final_only = smoothing_term("final", exits, logits, labels, [("logits", "confidence_logit")], 0.2)
    torch.testing.assert_close(final_only, plain(logits, labels, label_smoothing=0.2) - plain(logits, labels))


def test_mixed_schedule_trains_the_backbone_first_then_everything():
    spec = dataclasses.replace(TrainSpec(epochs=6, schedule="mixed", loss="v4"), warmup_loss="v0")
    assert [epoch_loss(spec, e) for e in range(6)] == [
        ("final", False), ("final", False), ("final", False), ("v0", False), ("v4", True), ("v4", True)]
    joint = dataclasses.replace(spec, schedule="joint")
    assert [epoch_loss(joint, e)[0] for e in range(3)] == ["v0", "v4", "v4"]


def test_spec_refuses_what_no_run_can_use():
    for bad, message in ((TrainSpec(label_smoothing=1.0), "label-smoothing"), (TrainSpec(schedule="later"), "schedule"),
                         (TrainSpec(optimizer="lion"), "choose from: adamw, sgd"), (TrainSpec(epochs=0), "--epochs")):
        with pytest.raises(ConfigError, match=message):
            bad.check()


def test_recipe_is_recorded_in_model_pt_and_shown_by_info(tmp_path):
    from edgeexit.train.models import read_checkpoint

    out = tmp_path / "model.pt"
    args = ["train", "--backbone", "resnet8", "--input-size", "16", "--epochs", "2", "--exit-type", "plain",
            "--placement", "linear", "--augment", "basic", "--label-smoothing", "0.1", "--optimizer", "sgd",
            "--schedule", "mixed", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    spec = read_checkpoint(out)["extra"]["train"]
    assert {k: spec[k] for k in ("augment", "flip", "label_smoothing", "optimizer", "lr", "schedule", "loss", "epochs")} == {
        "augment": "basic", "flip": False, "label_smoothing": 0.1, "optimizer": "sgd", "lr": 0.05, "schedule": "mixed",
        "loss": "v4", "epochs": 2}
    assert spec["head_lr"] == pytest.approx(0.05 / 3)  # eenet's heads: a third of the backbone's rate, any optimizer
    shown = CliRunner().invoke(main, ["info", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "sgd lr 0.05" in shown.output and "schedule mixed" in shown.output and "augment basic" in shown.output
    assert "label smoothing 0.1" in shown.output


def test_sgd_is_the_papers_setting():
    from edgeexit.train.hardware import make_optimizer

    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainSpec(optimizer="sgd"))
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["lr"]) == (0.9, True, 5e-4, 0.05)
