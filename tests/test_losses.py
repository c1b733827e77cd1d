"""EENets losses v1/v2/v4: the recursive mixtures and the exit tags on hand-made tensors, and v2's cure for dead exits."""
import math

import pytest
import torch
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.train.losses import LOSSES, exit_tags, get_loss
from edgeexit.errors import ConfigError

# two exits and the final classifier, one input of true class 0, probabilities given as log-logits
P0, P1, PF = [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]
H0, H1 = 0.5, 0.25
COSTS = [0.2, 0.5, 1.0]
LAM = 0.5


def hand_made(h0: float = H0, h1: float = H1) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Exit outputs (logits, confidence logit) and final logits whose softmaxes are P0, P1, PF and sigmoids h0, h1."""
    logits = [torch.tensor([p]).log().requires_grad_() for p in (P0, P1, PF)]
    confidences = [torch.tensor([[math.log(h / (1 - h))]], requires_grad=True) for h in (h0, h1)]
    exits = [(logits[0], confidences[0]), (logits[1], confidences[1])]
    return exits, logits[2], torch.tensor([0])


def hand_mixtures():
    """The recursion by hand: P_1 = h1 p1 + (1 - h1) pF, P_0 = h0 p0 + (1 - h0) P_1, same for the cost."""
    p1_mix = H1 * P1[0] + (1 - H1) * PF[0]
    p0_mix = H0 * P0[0] + (1 - H0) * p1_mix
    c1_mix = H1 * COSTS[1] + (1 - H1) * COSTS[2]
    c0_mix = H0 * COSTS[0] + (1 - H0) * c1_mix
    return p0_mix, p1_mix, c0_mix, c1_mix


def test_v1_is_ce_and_cost_of_the_full_recursive_mixture():
    exits, final, target = hand_made()
    p0_mix, p1_mix, c0_mix, _ = hand_mixtures()
    assert (p1_mix, p0_mix, c0_mix) == pytest.approx((0.3, 0.6, 0.5375))
    loss = get_loss("v1")(exits, final, target, COSTS, LAM)
    assert loss.item() == pytest.approx(-math.log(p0_mix) + LAM * c0_mix, rel=1e-6)


def test_v2_sums_the_loss_of_every_exits_mixture_and_the_final():
    exits, final, target = hand_made()
    p0_mix, p1_mix, c0_mix, c1_mix = hand_mixtures()
    expected = sum(-math.log(p) + LAM * c for p, c in [(p0_mix, c0_mix), (p1_mix, c1_mix), (PF[0], COSTS[2])])
    loss = get_loss("v2")(exits, final, target, COSTS, LAM)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_batch_terms_are_means_over_inputs():
    single = [get_loss("v1")(*hand_made(h0, h1), COSTS, LAM) for h0, h1 in [(0.5, 0.25), (0.9, 0.1)]]
    exits_a, final, _ = hand_made(0.5, 0.25)
    exits_b, _, _ = hand_made(0.9, 0.1)
    batched = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(exits_a, exits_b)]
    loss = get_loss("v1")(batched, torch.cat([final, final]), torch.tensor([0, 0]), COSTS, LAM)
    assert loss.item() == pytest.approx(sum(s.item() for s in single) / 2, rel=1e-6)


def test_v1_starves_later_exits_once_the_first_is_sure_and_v2_does_not():
    """With h_0 ~ 1 the v1 mixture is exit 0 alone: exit 1 and the final get (almost) no gradient (dead)."""
    grads = {}
    for name in ("v1", "v2"):
        exits, final, target = hand_made(h0=1 - 1e-12)
        get_loss(name)(exits, final, target, COSTS, LAM).backward()
        grads[name] = [exits[1][0].grad.abs().sum().item(), exits[1][1].grad.abs().sum().item(),
                       final.grad.abs().sum().item()]
    assert all(g < 1e-9 for g in grads["v1"])
    assert all(g > 1e-3 for g in grads["v2"])


def test_cost_term_pulls_confidence_up_when_predictions_are_equal():
    """Same prediction everywhere: only the cost differs, so leaving early must lower the loss."""
    exits, final, target = hand_made()
    same = [(final.detach().clone(), conf) for _, conf in exits]
    get_loss("v1")(same, final.detach(), target, COSTS, LAM).backward()
    assert all(conf.grad.item() < 0 for _, conf in same)


def test_lambda_zero_leaves_only_the_classification_term():
    exits, final, target = hand_made()
    with_cost = get_loss("v2")(exits, final, target, COSTS, 1.0).item()
    without = get_loss("v2")(exits, final, target, COSTS, 0.0).item()
    c1_mix = H1 * COSTS[1] + (1 - H1) * COSTS[2]
    c0_mix = H0 * COSTS[0] + (1 - H0) * c1_mix
    assert with_cost - without == pytest.approx(c0_mix + c1_mix + COSTS[2], rel=1e-6)


def test_unknown_loss_lists_the_registry():
    with pytest.raises(ConfigError, match="unknown loss 'v9'.*v1, v2"):
        get_loss("v9")
    assert {"v1", "v2"} <= set(LOSSES)


def test_cli_unknown_loss_is_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(main, ["train", "--backbone", "resnet8", "--input-size", "16", "--epochs", "1",
                                       "--loss", "v9", "--out", str(out)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown loss 'v9'")
    assert all(name in lines[0] for name in ("v1", "v2"))
    assert not out.exists()


# v4 on three inputs: A (class 0) is easy at exit 0, B (class 1) only the final gets right, C (class 1) exit 1 does
V4_PROBS = {  # per input: softmax of exit 0, exit 1, final
    "A": ([0.9, 0.1], [0.6, 0.4], [0.2, 0.8]),
    "B": ([0.9, 0.1], [0.6, 0.4], [0.2, 0.8]),
    "C": ([0.5, 0.5], [0.1, 0.9], [0.2, 0.8]),
}
V4_TARGET = [0, 1, 1]
V4_H = ([0.8, 0.3, 0.5], [0.6, 0.2, 0.7])  # sigmoid of each exit's confidence logit, per input


def v4_tensors(h=V4_H):
    """Exit outputs with confidence logits log(h / (1 - h)), final logits, targets for the three inputs."""
    columns = list(zip(*V4_PROBS.values()))  # per classifier, the three inputs' probabilities
    logits = [torch.tensor(col).log().requires_grad_() for col in columns]
    z = [torch.tensor([[math.log(p / (1 - p))] for p in hs], requires_grad=True) for hs in h]
    return [(logits[0], z[0]), (logits[1], z[1])], logits[2], torch.tensor(V4_TARGET)


def test_v4_exit_tags_are_the_cheapest_good_enough_exit():
    exits, final, target = v4_tensors()
    # CE + lambda c: A 0.105+0.1 | 0.511+0.25 | 1.609+0.5 -> 0; B 2.303+0.1 | 0.916+0.25 | 0.223+0.5 -> final;
    # C 0.693+0.1 | 0.105+0.25 | 0.223+0.5 -> 1
    assert exit_tags(exits, final, target, COSTS, LAM).tolist() == [0, 2, 1]
    assert exit_tags(exits, final, target, COSTS, 0.0).tolist() == [0, 2, 1]
    assert exit_tags(exits, final, target, COSTS, 5.0).tolist() == [0, 0, 0]  # cost dominates: leave at once


def test_v4_is_every_classifiers_ce_plus_balanced_bce_toward_the_tags():
    exits, final, target = v4_tensors()
    tags = torch.tensor([0, 2, 1])
    ce = sum(-sum(math.log(probs[k][t]) for probs, t in zip(V4_PROBS.values(), V4_TARGET)) / 3 for k in range(3))
    # exit 0: one positive (A) of three -> positives weighted 2/3, negatives 1/3; exit 1: one positive (C)
    bce0 = (2 / 3 * -math.log(0.8) + 1 / 3 * -math.log(1 - 0.3) + 1 / 3 * -math.log(1 - 0.5)) / 3
    bce1 = (1 / 3 * -math.log(1 - 0.6) + 1 / 3 * -math.log(1 - 0.2) + 2 / 3 * -math.log(0.7)) / 3
    loss = get_loss("v4")(exits, final, target, COSTS, LAM, tags=tags)
    assert loss.item() == pytest.approx(ce + bce0 + bce1, rel=1e-6)
    loss.backward()
    z0 = exits[0][1].grad[:, 0]
    assert z0[0] < 0 < z0[1] and z0[2] > 0  # A's confidence pushed up, B's and C's down at exit 0


def test_v4_gradients_stay_bounded_on_saturated_confidence_logits():
    """A logit of 200 toward the wrong tag gets a gradient of its class weight / batch, not NaN or 0."""
    exits, final, target = v4_tensors(h=([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]))
    z = torch.tensor([[200.0], [-200.0], [150.0]], requires_grad=True)
    exits[0] = (exits[0][0], z)
    loss = get_loss("v4")(exits, final, target, COSTS, LAM, tags=torch.tensor([1, 0, 2]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert z.grad[:, 0].tolist() == pytest.approx([1 / 9, -2 / 9, 1 / 9], rel=1e-6)  # (sigmoid(z) - y) w / 3


def test_v2_mixture_is_finite_for_saturated_confidence_logits():
    """The mixtures are formed in log space: logits of +-200 give a finite loss and gradient (no log(0))."""
    exits, final, target = hand_made()
    z = torch.tensor([[200.0]], requires_grad=True)
    loss = get_loss("v2")([(exits[0][0], z), exits[1]], final, target, COSTS, LAM)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(final.grad).all()


def test_default_eenet_loss_trains_an_exit_its_confidence_has_given_up():
    """An exit with h ~ 0 (z = -12): under v2 its classifier learns only through h and is dead; the default
    (v4) still gives it its own CE gradient, so a weak early exit keeps learning."""
    from edgeexit.train.methods import get_method

    grads = {}
    for name in ("v2", get_method("eenet").loss):
        exits, final, target = hand_made(h0=1 / (1 + math.exp(12)))
        extra = {"tags": torch.tensor([2])} if name == "v4" else {}
        get_loss(name)(exits, final, target, COSTS, LAM, **extra).backward()
        grads[name] = exits[0][0].grad.abs().sum().item()
    assert get_method("eenet").loss == "v4"
    assert grads["v2"] < 1e-4 < 0.1 < grads["v4"]


def test_distillation_is_alpha_t_squared_kl_from_the_softened_final_on_hand_made_tensors():
    """Two exits, three classes, one input: alpha T^2 sum_k sum_c q_c log(q_c / p_kc), q = softmax(final / T)."""
    from edgeexit.train.losses import distillation

    temperature, alpha = 2.0, 0.3
    final = torch.tensor([[2.0, 0.0, -2.0]], requires_grad=True)
    exit_logits = [torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True), torch.tensor([[4.0, -2.0, 0.0]], requires_grad=True)]
    softmax = lambda v: [math.exp(a / temperature) / sum(math.exp(b / temperature) for b in v) for a in v]  # noqa: E731
    q = softmax([2.0, 0.0, -2.0])
    expected = alpha * temperature**2 * sum(
        sum(qc * math.log(qc / pc) for qc, pc in zip(q, softmax(z))) for z in ([0.0, 0.0, 0.0], [4.0, -2.0, 0.0])
    )
    got = distillation([(z, torch.zeros(1, 1)) for z in exit_logits], final, temperature, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert final.grad is None or float(final.grad.abs().sum()) == 0.0  # the teacher is detached
    assert all(float(z.grad.abs().sum()) > 0 for z in exit_logits)
    # an exit that already matches the softened final adds nothing (and no gradient)
    same = torch.tensor([[2.0, 0.0, -2.0]], requires_grad=True)
    assert distillation([(same,)], final, temperature, alpha).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("value, expected", [("3,0.5", (3.0, 0.5)), ("off", None), (None, None), ("1, 0", (1.0, 0.0))])
def test_parse_distill(value, expected):
    from edgeexit.train.config import parse_distill

    assert parse_distill(value) == expected


@pytest.mark.parametrize("value", ["3", "0,0.5", "3,-1", "a,b", "1,2,3", "inf,1"])
def test_parse_distill_rejects_bad_values(value):
    from edgeexit.train.config import parse_distill

    with pytest.raises(ConfigError, match="--distill"):
        parse_distill(value)


def test_cli_bad_distill_is_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(main, ["train", "--backbone", "resnet8", "--input-size", "16", "--epochs", "1",
                                       "--distill", "3", "--out", str(out)])
    assert result.exit_code == ConfigError.exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --distill takes T,ALPHA"), result.output
    assert not out.exists()


def test_training_with_distill_records_it_and_moves_the_exits_toward_the_final(tmp_path):
    """The same tiny run with and without --distill: model.pt records the setting, and the exits' softmax ends closer
    (lower KL) to the final classifier's with it."""
    from conftest import tiny_train
    from edgeexit.train.data import load_data
    from edgeexit.train.losses import distillation
    from edgeexit.train.models import load_model, read_checkpoint

    val = load_data("digits", input_size=16).val
    x = torch.stack([val[i][0] for i in range(64)])
    kl = {}
    for setting in ("off", "2,1.0"):
        run = tmp_path / setting.replace(",", "_")
        run.mkdir()
        path = tiny_train(run, distill=setting, epochs=2)
        assert read_checkpoint(path)["extra"]["train"]["distill"] == setting
        with torch.no_grad():
            exits, final = load_model(path)(x)
        kl[setting] = float(distillation(exits, final, 2.0, 1.0))
    assert kl["2,1.0"] < kl["off"]
