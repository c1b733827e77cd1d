"""Latency prediction from a device profile: a cascade's expected latency from its exit histogram.

Profiles are measured by `edgeexit profile` (runtime/profile.py) and stored in the manifest.
Prediction from an exit histogram (fractions f_k of inputs leaving at exit k, the last
entry = the final stage), in ms per call at the profile's batch size B:

- B = 1: a call's latency is drawn from exit k's distribution with probability f_k, so the
  latency is a mixture. Its mean is sum f_k * mean_k. A percentile q is the t that solves
  sum f_k F_k(t) = q, where F_k is exit k's CDF taken piecewise linear through its measured
  (min, p50, p95, p99) and reaching 1 at p99 + (p99 - p95); solved exactly on that model.
  When the exits' latency ranges do not overlap (the usual case: each exit adds a stage)
  this is the q-quantile of "which exit" read inside the exit where it falls.
- B > 1: every stage runs once per call on the inputs still alive, N_j ~ Binomial(B, s_j)
  with s_j the fraction reaching stage j. Stage j's marginal cost m_j(n) is taken affine in
  n through its batch-1 cost (from `exits_at_one`) and its batch-B cost (difference of
  consecutive `exits`), and 0 when no input reaches it; the prediction is
  exits[0] + sum_j E[m_j(N_j)]. For p50/p95/p99 the same sum uses the exits' percentiles at
  batch B: a sum of per-stage percentiles, an upper estimate of the percentile of the sum.

A latency budget (`calibrate --latency-budget MS --percentile P`) bounds one of two things:
`mean`, the mean ms per input (what throughput sees: the mean per call over the batch size),
or `95` / `99`, that percentile of the ms per call (the tail a caller waits). The p50 of a
two-mode mixture is no target: it jumps from one exit's time to the next as the exit shares
cross one half.
"""
from __future__ import annotations

import platform
from typing import Sequence

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.runtime.profiles import DeviceProfile, Timing, profile_key
from edgeexit.runtime.manifest import Manifest

STATS = ("mean", "p50", "p95", "p99")
PERCENTILES = ("mean", "95", "99")  # what a latency budget bounds (see the module doc)
DEFAULT_PERCENTILE = "mean"


def current_host() -> str:
    """The name profiles measured here are stored under."""
    return platform.node() or platform.machine() or "host"


def find_profile(manifest: Manifest, name: str) -> DeviceProfile:
    """The profile stored under `name`, or a ConfigError naming the profiles the bundle has."""
    profiles = manifest.profiles
    if name in profiles:
        return profiles[name]
    if not profiles:
        raise ConfigError(f"bundle {manifest.root} has no latency profiles (looked for '{name}'); "
                          "measure one with `edgeexit profile BUNDLE --device D --threads N --batch-size B`")
    raise ConfigError(f"bundle {manifest.root} has no profile '{name}'; it has profiles for: {', '.join(profiles)}")


def matching_profile(manifest: Manifest, device: str, threads: int | None, batch_size: int,
                     engine: str) -> DeviceProfile | None:
    """The profile measured on this host for this device, thread count, batch size and engine, if any."""
    return manifest.profiles.get(profile_key(current_host(), device, threads or 0, batch_size, engine))


def select_profile(manifest: Manifest, name: str | None, engine: str, threads: int | None = None) -> DeviceProfile:
    """The profile named `name`, or else the one measured on this host for `engine` (and `threads` when given):
    a ConfigError listing the candidates when none or several match."""
    if name is not None:
        return find_profile(manifest, name)
    host = current_host()
    found = [p for p in manifest.profiles.values()
             if p.host == host and p.engine == engine and (threads is None or p.threads == (threads or 0))]
    if len(found) == 1:
        return found[0]
    wanted = f"this host ({host}) and the {engine} engine" + ("" if threads is None else f" at {threads} threads")
    if not found:
        has = f"; it has: {', '.join(manifest.profiles)}" if manifest.profiles else ""
        raise ConfigError(f"bundle {manifest.root} has no latency profile of {wanted}{has}; measure one with "
                          f"`edgeexit profile BUNDLE --threads N --batch-size B`, or name one with --profile NAME")
    raise ConfigError(f"{len(found)} profiles of {wanted} match: {', '.join(p.key for p in found)}; "
                      "choose one with --profile NAME")


def calibration_profile(manifest: Manifest, name: str | None, for_budget: bool, engine: str,
                        threads: int | None = None, device: str = "cpu") -> DeviceProfile | None:
    """The profile `calibrate` predicts with: `name`; else, for a latency budget, this host's one profile for
    `engine` (select_profile); else the one matching `run` at batch 1 on this device and threads, if any."""
    if name is not None or for_budget:
        return select_profile(manifest, name, engine, threads)
    return matching_profile(manifest, device, threads, 1, engine)


def exit_fractions(exit_counts: Sequence[int]) -> np.ndarray:
    """Fractions of inputs leaving at each exit (last = final stage)."""
    counts = np.asarray(exit_counts, dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


def _cdf_knots(timing: Timing) -> tuple[np.ndarray, np.ndarray]:
    """(ms, probability) knots of one exit's piecewise-linear CDF model."""
    ms = [timing.min, timing.p50, timing.p95, timing.p99, timing.p99 + (timing.p99 - timing.p95)]
    return np.maximum.accumulate(np.asarray(ms)), np.asarray([0.0, 0.5, 0.95, 0.99, 1.0])


def mixture_quantile(timings: Sequence[Timing], fractions: np.ndarray, q: float) -> float:
    """The q-quantile of a latency that is exit k's with probability fractions[k] (see the module doc)."""
    knots = [_cdf_knots(t) for t, f in zip(timings, fractions) if f > 0]
    weights = [f for f in fractions if f > 0]
    points = np.unique(np.concatenate([ms for ms, _ in knots]))
    cdf = sum(w * np.interp(points, ms, p, left=0.0, right=1.0) for w, (ms, p) in zip(weights, knots))
    index = int(np.searchsorted(cdf, q - 1e-12))
    if index == 0:
        return float(points[0])
    lo, hi = cdf[index - 1], cdf[index]
    return float(points[index - 1] + (points[index] - points[index - 1]) * (q - lo) / max(hi - lo, 1e-15))


def predict_latency(profile: DeviceProfile, exit_counts: Sequence[int], stat: str = "mean") -> float:
    """Predicted ms per call at the profile's batch size for this exit histogram (`stat`: mean, p50, p95, p99)."""
    if stat not in STATS:
        raise ConfigError(f"unknown latency statistic '{stat}'; choose from: {', '.join(STATS)}")
    f = exit_fractions(exit_counts)
    if len(f) != len(profile.exits):
        raise ConfigError(f"exit histogram has {len(f)} entries, the profile {len(profile.exits)} exits")
    cost = np.asarray([t.stat(stat) for t in profile.exits])
    batch = profile.batch_size
    if batch == 1:
        return float(f @ cost) if stat == "mean" else mixture_quantile(profile.exits, f, float(stat[1:]) / 100)
    alive = np.cumsum(f[::-1])[::-1]  # fraction reaching each stage
    at_one = np.asarray([t.stat(stat) for t in profile.exits_at_one])
    total = cost[0]
    for j in range(1, len(cost)):
        full_batch, single = cost[j] - cost[j - 1], at_one[j] - at_one[j - 1]
        any_alive = 1.0 - (1.0 - alive[j]) ** batch
        total += any_alive * single + (full_batch - single) * (batch * alive[j] - any_alive) / (batch - 1)
    return float(total)


def budget_stat(percentile: str) -> tuple[str, str]:
    """(profile statistic, unit) a budget at `percentile` (mean, 95, 99) is predicted in; ConfigError otherwise."""
    if percentile not in PERCENTILES:
        raise ConfigError(f"unknown latency percentile '{percentile}'; choose from: {', '.join(PERCENTILES)}")
    return ("mean", "ms per input") if percentile == "mean" else (f"p{percentile}", "ms per call")


def budget_latency(profile: DeviceProfile, exit_counts: Sequence[int], percentile: str) -> float:
    """The latency a budget at `percentile` bounds, predicted for this exit histogram: mean ms per input, or
    the percentile of ms per call."""
    stat, _ = budget_stat(percentile)
    value = predict_latency(profile, exit_counts, stat)
    return value / profile.batch_size if stat == "mean" else value


def cheapest_latency(profile: DeviceProfile, percentile: str) -> float:
    """The least latency a budget at `percentile` can reach: every input leaving at the first exit."""
    stat, _ = budget_stat(percentile)
    value = profile.exits[0].stat(stat)
    return value / profile.batch_size if stat == "mean" else value


def latency_prediction(profile: DeviceProfile, exit_counts: Sequence[int]) -> dict:
    """Report entry: the profile used and the predicted ms per call and per input."""
    per_call = {stat: predict_latency(profile, exit_counts, stat) for stat in STATS}
    return {"profile": profile.key, "per_call_ms": per_call, "mean_per_input_ms": per_call["mean"] / profile.batch_size,
            "full_onnx_ms": {"p50": profile.full.p50, "p95": profile.full.p95}}


def describe_profile(profile: DeviceProfile) -> list[str]:
    """Readable lines of a profile: each exit's cumulative cost beside full.onnx."""
    lines = [f"profile {profile.key} ({', '.join(profile.providers)}, {profile.repeats} repeats, ms per call of "
             f"{profile.batch_size}): full.onnx p50 {profile.full.p50:.3f} p95 {profile.full.p95:.3f}"]
    last = len(profile.exits) - 1
    for k, (stage, leave) in enumerate(zip(profile.stages, profile.exits)):
        where = "final stage" if k == last else f"exit {k}"
        lines.append(f"  stage_{k}: p50 {stage.p50:.3f} p95 {stage.p95:.3f}; leaving at {where}: p50 {leave.p50:.3f} "
                     f"p95 {leave.p95:.3f} ({leave.p50 / profile.full.p50:.2f} of full.onnx)")
    return lines
