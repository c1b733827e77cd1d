"""EENets exit blocks as the paper defines them; every exit type x loss x placement trains, exports, verifies and runs."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from edgeexit.train.config import TrainSpec
from edgeexit.train.data import DataSplits, load_data
from edgeexit.train.exits import CONFIDENCE_BIAS_INIT, EXITS, build_exit
from edgeexit.export import export_bundle
from edgeexit.export.verify import torch_stage_outputs
from edgeexit.train.macs import count_macs, count_params
from edgeexit.train.models import load_model, save_model
from edgeexit.train.placement import SCHEMES
from edgeexit.runtime import CascadeRunner, load_manifest
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.errors import ConfigError
from edgeexit.train.assembly import build_model
from edgeexit.train.trainer import train_model

EENET_EXITS = ("plain", "pool", "bnpool")
FEATURES = (8, 4, 4)


@pytest.mark.parametrize("name", EENET_EXITS)
def test_exit_block_has_softmax_and_sigmoid_confidence_branches(name):
    head = build_exit(name, FEATURES, 10).eval()
    assert head.outputs == ("logits", "confidence_logit")
    x = torch.randn(5, *FEATURES) * 10
    logits, confidence_logit = head(x)
    assert logits.shape == (5, 10) and confidence_logit.shape == (5, 1)
    # the confidence branch is exported pre-sigmoid: exactly the linear layer on the trunk's features
    torch.testing.assert_close(confidence_logit, head.confidence(head.trunk(x)))
    assert head.confidence.bias.item() == CONFIDENCE_BIAS_INIT < 0  # new heads start by sending inputs on
    branches = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [b.out_features for b in branches] == [10, 1]  # one linear layer per branch, nothing else learned
    flat = 8 * 4 * 4 if name == "plain" else 8
    assert all(b.in_features == flat for b in branches)


def test_trunks_are_plain_pool_and_bn_relu_pool():
    kinds = {name: [type(m) for m in build_exit(name, FEATURES, 10).trunk.modules()
                    if not isinstance(m, (nn.Sequential, nn.Flatten))] for name in EENET_EXITS}
    assert kinds["plain"] == []
    assert kinds["pool"] == [nn.AdaptiveAvgPool2d]
    assert kinds["bnpool"] == [nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d]


def test_pooled_exits_cost_a_fraction_of_plain_ones():
    macs = {name: count_macs(build_exit(name, FEATURES, 10), FEATURES) for name in EENET_EXITS}
    assert macs["plain"] == 8 * 4 * 4 * 11
    assert macs["pool"] == macs["bnpool"] == 8 * 11
    assert count_params(build_exit("bnpool", FEATURES, 10)) == count_params(build_exit("pool", FEATURES, 10)) + 2 * 8


def test_unknown_exit_type_lists_the_registry():
    with pytest.raises(ConfigError, match="unknown exit type 'dense'; choose from: plain, pool, bnpool"):
        build_exit("dense", FEATURES, 10)
    assert set(EENET_EXITS) <= set(EXITS)


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return load_data("digits", input_size=16)


def train_export_run(tmp_path, data: DataSplits, backbone: str, exit_type: str, loss: str, placement: str) -> None:
    """Train one epoch on a slice of digits, export (verification on), then check the runtime's decisions."""
    small = DataSplits(Subset(data.train, range(192)), Subset(data.val, range(64)), data.test, data.info)
    model = build_model(small, backbone, exit_type, placement, 2)
    train_model(model, small, TrainSpec(epochs=1, batch_size=64, loss=loss), progress=False)
    save_model(model, tmp_path / "model.pt")
    export_bundle(tmp_path / "model.pt", tmp_path / "bundle")  # raises VerificationError on any mismatch

    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.model.exit_type == exit_type and list(manifest.model.cuts) == model.config.cuts
    runner = CascadeRunner(tmp_path / "bundle", threads=1)
    x, y = load_eval_data("digits", "test", runner.manifest.input_spec)
    x, y = x[:96], y[:96]
    stages = torch_stage_outputs(load_model(tmp_path / "model.pt"), x)
    confidence_logits = np.stack([stage[2][:, 0] for stage in stages[:-1]], axis=1).astype(np.float64)
    logits = np.stack([stage[1] for stage in stages[:-1]] + [stages[-1][0]], axis=1)
    thresholds = np.asarray(runner.thresholds)
    cutoffs = np.log(thresholds) - np.log1p(-thresholds)  # sigmoid(z) >= T  <=>  z >= logit(T)
    reached = confidence_logits >= cutoffs
    expected_exit = np.where(reached.any(1), reached.argmax(1), len(stages) - 1)
    clear = (np.abs(confidence_logits - cutoffs) > 1e-4).all(1)  # no float ties at T
    result = runner.predict(x)
    np.testing.assert_array_equal(result.exit_index[clear], expected_exit[clear])
    np.testing.assert_array_equal(result.predictions[clear], logits[np.arange(len(x)), expected_exit].argmax(1)[clear])
    assert sum(result.exit_counts()) == len(x)


@pytest.mark.parametrize("exit_type, loss, placement", [("plain", "v1", "fine"), ("pool", "v2", "pareto"), ("bnpool", "v2", "golden"), ("pool", "v4", "linear")])
def test_exit_types_and_losses_export_verify_and_run(tmp_path, digits16, exit_type, loss, placement):
    """Each exit type once by default (pool is the eenet default), both losses; the whole product is slow."""
    train_export_run(tmp_path, digits16, "eenet8", exit_type, loss, placement)


@pytest.mark.slow
@pytest.mark.parametrize("exit_type, loss, placement", list(itertools.product(EENET_EXITS, ("v1", "v2", "v4"), SCHEMES)))
def test_every_exit_type_loss_and_placement_exports_verifies_and_runs(tmp_path, exit_type, loss, placement):
    """ResNet-20 on 8x8 digits: its nine cut points give each scheme its own pair of exits."""
    train_export_run(tmp_path, load_data("digits", input_size=8), "resnet20", exit_type, loss, placement)
