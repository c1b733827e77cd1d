"""Placement schemes: the paper's cost targets, the first-reaching-cut-point rule, and bad input via the CLI."""
import math

import pytest
from click.testing import CliRunner

from edgeexit.train.backbones import build_backbone
from edgeexit.cli import main
from edgeexit.train.cuts import CutGraph, CutPoint
from edgeexit.train.placement import SCHEMES, place_exits, scheme_targets
from edgeexit.errors import ConfigError
from edgeexit.train.assembly import choose_cuts

PHI = (1 + math.sqrt(5)) / 2


def points(*fractions: float) -> list[CutPoint]:
    """Synthetic candidates c0, c1, ... at the given cost fractions (of 1000 MACs)."""
    return [CutPoint(f"c{i}", f"n{i}", (8, 4, 4), int(f * 1000), f) for i, f in enumerate(fractions)]


@pytest.fixture(scope="module")
def resnet20_graph() -> CutGraph:
    return CutGraph(build_backbone("resnet20", 10, 1), (1, 32, 32))


@pytest.mark.parametrize("scheme, num_exits, expected", [
    ("pareto", 3, [0.2, 0.36, 0.488]),
    ("golden", 2, [PHI ** -2, PHI ** -1]),
    ("golden", 3, [PHI ** -3, PHI ** -2, PHI ** -1]),
    ("fine", 3, [0.05, 0.0975, 1 - 0.95 ** 3]),
    ("linear", 3, [0.25, 0.5, 0.75]),
    ("quadratic", 3, [1 / 16, 4 / 16, 9 / 16]),
])
def test_scheme_targets_follow_the_papers_formulas(scheme, num_exits, expected):
    assert scheme_targets(scheme, num_exits) == pytest.approx(expected)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("num_exits", [1, 2, 5, 10])
def test_targets_increase_inside_the_cost_curve(scheme, num_exits):
    targets = scheme_targets(scheme, num_exits)
    assert len(targets) == num_exits
    assert 0 < targets[0] and targets[-1] < 1
    assert all(a < b for a, b in zip(targets, targets[1:]))


def test_each_exit_goes_at_the_first_cut_point_reaching_its_target():
    candidates = points(0.06, 0.15, 0.3, 0.45, 0.6, 0.8)
    names = {scheme: [p.name for p in place_exits(scheme, 2, candidates)] for scheme in SCHEMES}
    assert names == {
        "pareto": ["c2", "c3"],      # 0.2 -> 0.3, 0.36 -> 0.45
        "golden": ["c3", "c5"],      # 0.382 -> 0.45, 0.618 -> 0.8 (0.6 falls short)
        "fine": ["c0", "c1"],        # 0.05 -> 0.06, 0.0975 -> 0.15
        "linear": ["c3", "c5"],      # 0.333 -> 0.45, 0.667 -> 0.8
        "quadratic": ["c1", "c3"],   # 0.111 -> 0.15, 0.444 -> 0.45
    }


def test_a_target_already_passed_takes_the_next_free_cut_point():
    assert [p.name for p in place_exits("fine", 2, points(0.3, 0.4, 0.9))] == ["c0", "c1"]


def test_unreachable_target_is_a_one_line_error_naming_it():
    with pytest.raises(ConfigError, match=r"placement 'golden' cannot place exit 2 of 2: no cut point after c1 .*0\.618"):
        place_exits("golden", 2, points(0.1, 0.5, 0.55))


def test_more_exits_than_cut_points_and_unknown_scheme_list_the_choices():
    with pytest.raises(ConfigError, match=r"4 exits asked but the backbone has only 3 cut points \(c0, c1, c2\)"):
        place_exits("linear", 4, points(0.2, 0.5, 0.7))
    with pytest.raises(ConfigError, match="unknown placement scheme 'even'; choose from: pareto, golden, fine, linear, quadratic"):
        place_exits("even", 1, points(0.5))
    with pytest.raises(ConfigError, match="--num-exits must be >= 1"):
        place_exits("linear", 0, points(0.5))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_schemes_pick_real_resnet20_blocks_by_cumulative_macs(resnet20_graph, scheme):
    chosen = place_exits(scheme, 2, resnet20_graph.candidates)
    for point, target in zip(chosen, scheme_targets(scheme, 2)):
        assert point.fraction >= target
        assert point.name.startswith("layer")
        earlier = [p for p in resnet20_graph.candidates if p.fraction < point.fraction]
        assert all(p.fraction < target or p in chosen for p in earlier)
    assert chosen == sorted(chosen, key=lambda p: p.cumulative_macs)


def test_schemes_spread_differently_on_resnet20(resnet20_graph):
    picks = {tuple(p.name for p in place_exits(s, 2, resnet20_graph.candidates)) for s in SCHEMES}
    assert len(picks) == len(SCHEMES)


def test_exit_at_overrides_placement_and_bad_names_list_valid_cuts():
    net = build_backbone("resnet20", 10, 1)
    assert choose_cuts(net, (1, 32, 32), "pareto", 2, ["layer1.2", "layer3.0"]) == ["layer1.2", "layer3.0"]
    with pytest.raises(ConfigError, match="unknown cut point 'layer9'; valid cut points: relu, layer1.0"):
        choose_cuts(net, (1, 32, 32), "pareto", 2, ["layer9"])


def test_cli_cuts_lists_points_macs_and_each_schemes_picks(resnet20_graph):
    result = CliRunner().invoke(main, ["cuts", "--backbone", "resnet20", "--num-exits", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line for line in lines[2:2 + len(resnet20_graph.candidates)]}
    assert list(rows) == [p.name for p in resnet20_graph.candidates]
    for scheme in SCHEMES:
        chosen = [p.name for p in place_exits(scheme, 2, resnet20_graph.candidates)]
        summary = next(line for line in lines if line.strip().startswith(scheme + " "))
        assert summary.endswith("-> " + ", ".join(chosen))
        for point in resnet20_graph.candidates:
            assert (scheme in rows[point.name].split("  ")[-1].split(", ")) == (point.name in chosen)
    for point in resnet20_graph.candidates:
        assert f"{point.cumulative_macs / 1e6:.2f}" in rows[point.name]


@pytest.mark.parametrize("args, message, choices", [
    (["cuts", "--backbone", "resnet21"], "unknown backbone 'resnet21'", ["resnet20", "resnet110", "eenet8"]),
    (["cuts", "--backbone", "resnet20", "--num-exits", "12"], "12 exits asked but the backbone has only 9 cut points",
     ["layer1.0", "layer3.1"]),
    (["train", "--backbone", "resnet8", "--input-size", "16", "--placement", "even"], "unknown placement scheme 'even'",
     list(SCHEMES)),
    (["train", "--backbone", "resnet8", "--input-size", "16", "--num-exits", "4"], "4 exits asked", ["relu", "layer2.0"]),
    (["train", "--backbone", "resnet8", "--input-size", "16", "--exit-type", "dense"], "unknown exit type 'dense'",
     ["plain", "pool", "bnpool"]),
    (["train", "--backbone", "nope", "--input-size", "16"], "unknown backbone 'nope'", ["resnet8", "eenet8"]),
])
def test_cli_bad_choices_are_one_line_errors_listing_valid_ones(tmp_path, args, message, choices):
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(main, [*args, *(["--epochs", "1", "--out", str(out)] if args[0] == "train" else [])])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert all(choice in lines[0] for choice in choices)
    assert not out.exists()
