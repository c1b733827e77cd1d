"""Class exclusion end to end: the numpy policy, the trained heads, export, and the CLI's bad input."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime import CascadeRunner
from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.manifest import MANIFEST_NAME
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.policies import ExclusionPolicy, get_policy

from conftest import tiny_train
from handmade import reference_cascade

TIE_MARGIN = 1e-4


BETAS = (0.2, 0.3)


@pytest.fixture(scope="module")
def exclusion_bundle(tmp_path_factory):
    """A tiny resnet8 class-exclusion model on digits, exported and verified."""
    from edgeexit.export import export_bundle

    root = tmp_path_factory.mktemp("exclusion")
    model = tiny_train(root, method="exclusion", exit_type="exclusion", beta=list(BETAS))
    manifest = export_bundle(model, root / "bundle")
    return root / "bundle", manifest


@pytest.fixture(scope="module")
def digits(exclusion_bundle):
    from edgeexit.runtime.datasets import load_eval_data

    return load_eval_data("digits", "test", CascadeRunner(exclusion_bundle[0]).manifest.input_spec)


def as_logits(scores):
    """The exclusion logits whose sigmoid is `scores` (the heads export logits)."""
    scores = np.asarray(scores, dtype=np.float64)
    return {"exclusion_logits": np.log(scores / (1 - scores))}


def test_policy_matches_hand_worked_example():
    policy = ExclusionPolicy(0.0, {"beta": 0.5})
    mask = policy.start(3, 4)
    mask[2, 0] = False  # input 2 lost class 0 at an earlier stage
    scores = np.array([[0.9, 0.2, 0.5, 0.1],     # max 0.9, cut 0.45: keeps 0 and 2
                       [0.1, 0.8, 0.3, 0.39],    # max 0.8, cut 0.40: keeps only 1 -> exits
                       [0.95, 0.3, 0.2, 0.25]])  # max over 1..3 is 0.3, cut 0.15: keeps 1, 2, 3
    exits, preds, mask = policy.decide(as_logits(scores), mask)
    np.testing.assert_array_equal(exits, [False, True, False])
    np.testing.assert_array_equal(preds, [0, 1, 1])
    np.testing.assert_array_equal(mask, [[1, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1]])

    # next stage: a removed class never comes back, however high its score; 0.29 is not > 0.6 * 0.5
    exits, preds, mask = policy.decide(as_logits([[0.29, 0.9, 0.6, 0.1]] * 3), mask)
    np.testing.assert_array_equal(exits, [True, True, False])
    np.testing.assert_array_equal(preds, [2, 1, 1])
    np.testing.assert_array_equal(mask[2], [0, 1, 1, 0])

    # final stage: the classifier's best class among those still in play, not its overall argmax
    logits = np.array([[5.0, 1.0, 2.0, 9.0]] * 3)
    np.testing.assert_array_equal(policy.final(logits, mask), [2, 1, 2])
    np.testing.assert_array_equal(policy.final(logits, None), [3, 3, 3])


def test_static_floor_and_beta_one_keep_the_best_class_only():
    scores = as_logits([[0.3, 0.2, 0.25], [0.5, 0.5, 0.5]])
    start = np.ones((2, 3), dtype=bool)
    exits, preds, mask = ExclusionPolicy(1.0, {"beta": 1.0}).decide(scores, start)  # everything below the cut
    assert exits.all()
    np.testing.assert_array_equal(preds, [0, 0])
    np.testing.assert_array_equal(mask.sum(axis=1), [1, 1])
    exits, _, mask = ExclusionPolicy(0.35, {"beta": 0.0}).decide(scores, start)  # static floor only
    np.testing.assert_array_equal(exits, [True, False])
    np.testing.assert_array_equal(mask.sum(axis=1), [1, 3])
    exits, _, mask = ExclusionPolicy(0.0, {"beta": 0.0}).decide(scores, start)  # no exclusion at all
    assert not exits.any() and mask.all()


@pytest.mark.parametrize("args", [{"beta": 1.5}, {"beta": -0.1}, {"beta": "high"}, {"gamma": 0.5}])
def test_bad_policy_args_are_config_errors(args):
    with pytest.raises(ConfigError):
        get_policy("exclusion")(0.0, args)


def test_export_writes_exclusion_outputs_and_policy_and_verifies(exclusion_bundle):
    bundle, exported = exclusion_bundle
    manifest = exported.manifest.to_dict()
    stage = manifest["stages"][0]
    assert stage["exit"]["outputs"] == {"exclusion_logits": "exit_0_exclusion_logits"}
    assert [s["exit"]["policy"] for s in manifest["stages"][:-1]] == [
        {"kind": "exclusion", "threshold": 0.0, "args": {"beta": beta}} for beta in BETAS
    ]
    assert stage["outputs"][1]["shape"] == ["batch", manifest["num_classes"]]
    assert exported.worst_diff < 1e-4
    assert json.loads((bundle / MANIFEST_NAME).read_text())["model"]["method"] == "exclusion"


def test_trained_model_removes_classes_early_and_exits_more_as_beta_rises(exclusion_bundle, digits):
    """At a moderate beta the heads remove wrong classes and keep the true one; a higher beta sends more inputs out.

    (With the authors' loss a 3-epoch tiny model's heads are too weak for accurate early exits:
    measured at beta 0.95, 30% leave early at 41% accuracy; calibration keeps beta far lower.)
    """
    x, y = digits
    runner = CascadeRunner(exclusion_bundle[0], threads=1, policy_args={"beta": 0.7})
    outputs, _ = runner.stage_outputs(x)
    policy = runner.policies[0]
    _, _, mask = policy.decide(outputs[0], policy.start(len(x), runner.manifest.num_classes))
    assert (mask.sum(axis=1) < runner.manifest.num_classes).mean() >= 0.25, "exit 0 removed classes for too few inputs"
    assert mask[np.arange(len(y)), y].mean() >= 0.9, "exit 0 removed the true class too often"
    early = [(CascadeRunner(exclusion_bundle[0], threads=1, policy_args={"beta": b}).predict(x).exit_index < 2).mean()
             for b in (0.7, 0.95, 0.98)]
    assert early[0] <= early[1] <= early[2] and early[2] >= 0.5, early


@pytest.mark.parametrize("beta", [0.5, 0.97])
def test_batch_equals_one_by_one(exclusion_bundle, digits, beta):
    """Batched (compacted masks) vs one input at a time vs the reference cascade on the stored scores; inputs
    with a score within TIE_MARGIN of its cut may differ between batch sizes and are left out (and must be rare)."""
    runner = CascadeRunner(exclusion_bundle[0], threads=1, policy_args={"beta": beta})
    x = digits[0][:80]
    batched = runner.predict(x)
    single = [runner.predict(x[i : i + 1]) for i in range(len(x))]
    predictions, exit_index, margin = reference_cascade("exclusion", runner.thresholds, {"beta": beta}, *runner.stage_outputs(x))
    clear = margin > TIE_MARGIN
    assert clear.mean() >= 0.9
    for result in (batched.predictions, np.array([r.predictions[0] for r in single])):
        np.testing.assert_array_equal(result[clear], predictions[clear])
    for result in (batched.exit_index, np.array([r.exit_index[0] for r in single])):
        np.testing.assert_array_equal(result[clear], exit_index[clear])
    if beta == 0.97:  # some inputs leave at each exit, so compacted masks reach later stages
        assert len(set(batched.exit_index.tolist())) >= 2


def cli_error(args):
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return result.exit_code, lines[0]


@pytest.mark.parametrize("beta", ["1.5", "-0.2", "nan"])
def test_run_rejects_beta_outside_its_range(exclusion_bundle, beta):
    code, line = cli_error(["run", str(exclusion_bundle[0]), "--beta", beta])
    assert code == ConfigError.exit_code and "beta must be in [0.0, 1.0]" in line


def test_run_rejects_beta_for_a_confidence_bundle(tiny_bundle):
    code, line = cli_error(["run", str(tiny_bundle), "--beta", "0.5"])
    assert code == ConfigError.exit_code and "takes no argument 'beta'" in line


@pytest.mark.parametrize("command", [["run"], ["calibrate", "--target-drop", "1"]])
@pytest.mark.parametrize("policy", ["confidence", "max_softmax", "entropy"])
def test_policy_needing_outputs_the_bundle_lacks_is_a_one_line_error(exclusion_bundle, command, policy):
    """Exclusion heads output per-class scores only: no confidence logit, no class logits to softmax."""
    code, line = cli_error([command[0], str(exclusion_bundle[0]), *command[1:], "--policy", policy])
    assert code == ConfigError.exit_code and f"--policy {policy} needs exit outputs" in line


def test_bundle_with_wrong_exclusion_width_is_refused_at_load(exclusion_bundle, tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    bundle = tmp_path / "bundle"
    shutil.copytree(exclusion_bundle[0], bundle)
    path, name = bundle / "stage_0.onnx", "exit_0_exclusion_logits"
    model = onnx.load(path)
    classes = model.graph.output[1].type.tensor_type.shape.dim[1].dim_value
    for node in model.graph.node:
        node.output[:] = [f"{o}_all" if o == name else o for o in node.output]
    model.graph.initializer.extend(
        numpy_helper.from_array(np.array([v], dtype=np.int64), key) for key, v in (("s0", 0), ("s1", classes - 1), ("ax", 1))
    )
    model.graph.node.append(helper.make_node("Slice", [f"{name}_all", "s0", "s1", "ax"], [name]))
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = classes - 1
    onnx.save(model, path)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["stages"][0]["outputs"][1]["shape"] = ["batch", classes - 1]
    manifest["stages"][0]["sha256"] = sha256_file(path)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="one exclusion_logits score per class"):
        CascadeRunner(bundle)
    code, line = cli_error(["run", str(bundle)])
    assert code == BundleError.exit_code and name in line


def test_loss_matches_hand_worked_example():
    """Two exits, three classes, one input of class 0: CE(final) + lambda * sum_k w_k mean_c BCE(z_k, onehot; pos 8)."""
    from edgeexit.train.losses import get_loss

    z = [[1.0, 0.0, -1.0], [2.0, -1.0, 0.0]]
    final = [0.5, 0.0, 0.0]
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731  -log sigmoid(-v) = softplus(v)
    pos_weight = 4 * (3 - 1)
    bce = [(pos_weight * softplus(-zk[0]) + softplus(zk[1]) + softplus(zk[2])) / 3 for zk in z]
    ce = -math.log(math.exp(0.5) / (math.exp(0.5) + 2))
    expected = ce + 2.0 * (bce[0] / 2 + bce[1] / 1)  # weights 1/(N-k+1): 1/2 for exit 1, 1 for exit 2; lambda 2
    exits = [(torch.tensor([zk]),) for zk in z]
    got = get_loss("exclusion")(exits, torch.tensor([final]), torch.tensor([0]), [0.3, 0.6, 1.0], 2.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_beta_search_is_greedy_cheapest_exit_first_and_backs_off_two_steps():
    from edgeexit.runtime.calibrate import BETA_STEP, CascadeSimulator, search_betas, with_betas

    from test_calibrate import synthetic_outputs

    outputs, final, labels = synthetic_outputs()
    costs = [0.3, 0.6, 1.0]
    policies = [ExclusionPolicy(0.0) for _ in outputs]
    record = search_betas(policies, outputs, final, labels, costs, tolerance=2.0)
    betas = record["chosen"]["betas"]
    accuracy = lambda bs: CascadeSimulator(with_betas(policies, bs), outputs, final, labels, costs).evaluate([0.0, 0.0]).accuracy  # noqa: E731
    start = accuracy([0.0, 0.0])
    floor = start - 0.02
    assert record["search"]["order"] == [0, 1]
    assert record["chosen"]["accuracy"] > floor and record["chosen"]["met"]
    assert 0 < betas[0] < 1 and record["chosen"]["relative_macs"] < 1.0
    # exit 0 was searched with exit 1 at 0: one step above its beta still passed, two steps failed
    assert accuracy([betas[0] + BETA_STEP, 0.0]) > floor
    assert accuracy([betas[0] + 2 * BETA_STEP, 0.0]) <= floor


def test_beta_search_at_a_confidence_level_stops_where_the_margin_would_break():
    from statistics import NormalDist

    from edgeexit.runtime.calibrate import search_betas

    from test_calibrate import synthetic_outputs

    outputs, final, labels = synthetic_outputs()
    policies = [ExclusionPolicy(0.0) for _ in outputs]
    plain = search_betas(policies, outputs, final, labels, [0.3, 0.6, 1.0], tolerance=2.0)["chosen"]
    record = search_betas(policies, outputs, final, labels, [0.3, 0.6, 1.0], tolerance=2.0, confidence=0.9)
    chosen, floor = record["chosen"], float((final.argmax(1) == labels).mean()) - 0.02
    assert record["objective"] == {"target_drop": 2.0, "confidence_level": 0.9}
    assert chosen["met"] and chosen["accuracy"] - NormalDist().inv_cdf(0.9) * chosen["drop_se"] > floor
    assert chosen["betas"][0] < plain["betas"][0]  # the first exit searched stops earlier (later ones may then go further)


def test_beta_search_goes_to_one_when_no_step_costs_accuracy():
    """Exit 0's scores put the true class far ahead of the rest for every input: beta 1 (only the top class left)
    loses nothing, so the search keeps it instead of backing off from a failure that never came."""
    from edgeexit.runtime.calibrate import search_betas

    labels = np.arange(40) % 4
    exit0 = np.where(np.eye(4, dtype=bool)[labels], 6.0, -6.0)
    final = np.eye(4)[labels] * 5.0
    record = search_betas([ExclusionPolicy(0.0)], [{"exclusion_logits": exit0}], final, labels, [0.4, 1.0], tolerance=0.5)
    assert record["chosen"]["betas"] == [1.0]
    assert record["chosen"]["exit_counts"] == [40, 0] and record["chosen"]["accuracy"] == 1.0


def test_per_exit_beta_survives_reload_run_override_and_calibrate(exclusion_bundle, tmp_path):
    from edgeexit.runtime.bundle import save_calibration
    from edgeexit.runtime.calibrate import calibrate
    from edgeexit.runtime.datasets import load_eval_data

    bundle = tmp_path / "bundle"
    shutil.copytree(exclusion_bundle[0], bundle)
    assert [p.args["beta"] for p in CascadeRunner(bundle).policies] == list(BETAS)
    assert [p.args["beta"] for p in CascadeRunner(bundle, policy_args={"beta": [0.05, 0.4]}).policies] == [0.05, 0.4]
    assert [p.args["beta"] for p in CascadeRunner(bundle, policy_args={"beta": 0.15}).policies] == [0.15, 0.15]
    code, line = cli_error(["run", str(bundle), "--beta", "0.1,0.2,0.3"])
    assert code == ConfigError.exit_code and "one value or one per exit (2)" in line

    runner = CascadeRunner(bundle, threads=1)
    x, y = load_eval_data("digits", "val", runner.manifest.input_spec)
    record = calibrate(runner, x, y, ("target_drop", 1.0))
    save_calibration(str(bundle), record)
    reloaded = CascadeRunner(bundle)
    assert [p.args["beta"] for p in reloaded.policies] == pytest.approx(record["chosen"]["betas"])
    result = reloaded.predict(x)
    assert (result.predictions == y).mean() == pytest.approx(record["chosen"]["accuracy"])
    with pytest.raises(ConfigError, match="--target-drop"):
        calibrate(runner, x, y, ("budget", 0.5))

    fixed = CliRunner().invoke(main, ["calibrate", str(bundle), "--beta", "0.25,0.35", "--budget", "0.9"])
    assert fixed.exit_code == 0, fixed.output
    assert [p.args["beta"] for p in CascadeRunner(bundle).policies] == [0.25, 0.35]


def test_profiling_the_graph_of_an_exclusion_bundle_points_to_the_chain(exclusion_bundle, tmp_path):
    bundle = shutil.copytree(exclusion_bundle[0], tmp_path / "bundle")
    result = CliRunner().invoke(main, ["profile", str(bundle), "--engine", "graph", "--threads", "1", "--repeats", "4"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "cannot be profiled with the exclusion policy" in result.output and "--engine chain" in result.output
    chain = CliRunner().invoke(main, ["profile", str(bundle), "--engine", "chain", "--threads", "1", "--repeats", "4"])
    assert chain.exit_code == 0, chain.output


@pytest.mark.slow
def test_quantize_of_an_exclusion_bundle_keeps_the_fp32_accuracy_drop(exclusion_bundle, digits, tmp_path):
    pytest.importorskip("onnx")
    from edgeexit.export.quantize import quantize_bundle

    x, y = digits
    manifest = quantize_bundle(exclusion_bundle[0], tmp_path / "int8", x, y)
    assert manifest.precision == "int8" and "target_drop" in manifest.calibration["objective"]
    assert [e.policy.kind for e in manifest.exits] == ["exclusion"] * len(manifest.exits)
