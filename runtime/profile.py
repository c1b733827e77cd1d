"""`edgeexit profile`: measure a bundle's stage and exit latencies on this machine into a device profile.

For either engine. Stage chain: every stage (session run plus exit decision), every exit's
cumulative cost (a whole cascade call in which every input leaves there, so bookkeeping and
decisions count) and full.onnx. cascade.onnx (graph): every exit's cumulative cost, forced
through the thresholds input (each policy's `forcing` pair), and full.onnx; its stages are
not separate runs, so stage k is recorded as exit k's cost minus exit k-1's. All are timed
interleaved, in rotating order, after warm-up calls, so drift and
noise from other processes hit all alike. Each turn times BLOCK consecutive calls of one
variant: strict one-call interleaving evicts a small stage's weights from the cache between
its calls (measured: resnet8 at 16x16, exit 0 took 0.058 ms interleaved vs 0.051 ms in a
cascade run where every input leaves there). Inputs are seeded random tensors of
the bundle's shape: the graphs' cost does not depend on the pixel values.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgeexit.runtime.cascade import CascadeRunner, Runner
from edgeexit.errors import ConfigError
from edgeexit.runtime.graph import GraphRunner
from edgeexit.runtime.latency import current_host
from edgeexit.runtime.profiles import DeviceProfile, Timing
from edgeexit.runtime.report import Progress, interleaved_timings

DEFAULT_REPEATS = 100
WARMUP = 2
BLOCK = 5


class _ForcedExit:
    """A policy that still computes its decision (so its cost is timed) but exits all or none."""

    def __init__(self, policy, leave: bool) -> None:
        self.policy, self.leave = policy, leave

    def start(self, n: int, num_classes: int):
        return self.policy.start(n, num_classes)

    def decide(self, outputs, state):
        exits, predictions, state = self.policy.decide(outputs, state)
        return np.full(len(exits), self.leave), predictions, state

    def final(self, logits, state):
        return self.policy.final(logits, state)


def leaving_at(runner: CascadeRunner, exit_index: int) -> CascadeRunner:
    """A runner sharing `runner`'s sessions in which every input leaves at `exit_index` (num_exits = final)."""
    forced = copy.copy(runner)
    forced.policies = [_ForcedExit(p, i == exit_index) for i, p in enumerate(runner.policies)]
    return forced


def _stage_calls(runner: CascadeRunner, x: np.ndarray) -> list[Callable[[], object]]:
    """One callable per stage: its session run on its real input plus its exit decision."""
    calls = []
    features, state = None, runner.policies[0].start(len(x), runner.manifest.num_classes) if runner.policies else None
    for index, policy in enumerate(runner.policies):
        stage_input = runner.feed(index, x, features)

        def call(index=index, policy=policy, stage_input=stage_input, state=state):
            return policy.decide(runner._exit_outputs(index, runner.run_stage(index, stage_input)), state)

        calls.append(call)
        outputs = runner.run_stage(index, stage_input)
        state = policy.decide(runner._exit_outputs(index, outputs), state)[2]
        features = outputs[0]
    last = runner.num_exits
    final = runner.policies[-1].final if runner.policies else lambda logits, state: logits.argmax(axis=1)
    stage_input = runner.feed(last, x, features)
    calls.append(lambda stage_input=stage_input, state=state: final(runner.run_stage(last, stage_input)[0], state))
    return calls


def _block(fn: Callable[[], object]) -> Callable[[object], list[float]]:
    """`fn` run BLOCK times in a row; returns the seconds of each call."""
    def run(_: object) -> list[float]:
        seconds = []
        for _ in range(BLOCK):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return seconds

    return run


def time_calls(fns: dict[str, Callable[[], object]], repeats: int, progress: Progress = lambda m: None,
               label: str = "profile") -> dict[str, Timing]:
    """Timing of `repeats` warm calls of each fn, interleaved in rotating turns of BLOCK calls."""
    blocks = {name: _block(fn) for name, fn in fns.items()}
    timed = interleaved_timings(blocks, np.arange(math.ceil(repeats / BLOCK)), 1, WARMUP, progress, label)
    return {name: Timing.from_seconds([s for block in outputs for s in block]) for name, (outputs, _) in timed.items()}


def _exit_calls(runner: Runner, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """One call per exit: a cascade call on x in which every input leaves there (last = final stage)."""
    if isinstance(runner, GraphRunner):
        return {f"exit_{k}": (lambda t=_forcing_thresholds(runner, x, k): runner.predict(x, thresholds=t))
                for k in range(runner.num_exits + 1)}
    return {f"exit_{k}": (lambda r=leaving_at(runner, k): r.predict(x)) for k in range(runner.num_exits + 1)}


def _forcing_thresholds(runner: GraphRunner, x: np.ndarray, exit_index: int) -> list[float]:
    """Thresholds that send every input of x out at `exit_index` on cascade.onnx (checked on x)."""
    thresholds = []
    for k, policy in enumerate(runner.policies):
        if policy.forcing is None:
            raise ConfigError(f"cascade.onnx cannot be profiled with the {policy.name} policy (its exits cannot be forced "
                              f"through thresholds): profile the stage chain with --engine chain")
        thresholds.append(policy.forcing[0] if k == exit_index else policy.forcing[1])
    if not (runner.predict(x, thresholds=thresholds).exit_index == exit_index).all():
        raise ConfigError(f"thresholds {thresholds} did not send every profiling input out at exit {exit_index} "
                          f"(scores at the policy's extreme): profile the stage chain with --engine chain")
    return thresholds


def _differences(exits: tuple[Timing, ...]) -> tuple[Timing, ...]:
    """Per-stage costs of a graph profile: each exit's cumulative cost minus the previous one's, field by field."""
    stages = [exits[0]]
    for before, after in zip(exits, exits[1:]):
        values = np.maximum.accumulate(np.maximum(0.0, [after.min - before.min, after.p50 - before.p50,
                                                          after.p95 - before.p95, after.p99 - before.p99]))
        stages.append(Timing(max(0.0, after.mean - before.mean), *(float(v) for v in values)))
    return tuple(stages)


def measure_profile(runner: Runner, batch_size: int = 1, repeats: int = DEFAULT_REPEATS,
                    progress: Progress = lambda m: None, seed: int = 0) -> DeviceProfile:
    """Time every exit's cumulative cost, full.onnx and (stage chain) every stage on random inputs of `batch_size`,
    with the runner's engine (CascadeRunner: the stage chain; GraphRunner: cascade.onnx)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if repeats < 2:
        raise ConfigError(f"--repeats must be >= 2, got {repeats}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *runner.manifest.input_shape)).astype(np.float32)
    graph = isinstance(runner, GraphRunner)
    stages = {} if graph else {f"stage_{k}": call for k, call in enumerate(_stage_calls(runner, x))}
    timed = time_calls({**_exit_calls(runner, x), **stages, "full": lambda: runner.predict_full(x)}, repeats, progress,
                       f"profile {runner.engine} batch {batch_size}")
    num_stages = runner.num_exits + 1
    exits = tuple(timed[f"exit_{k}"] for k in range(num_stages))
    if batch_size == 1:
        at_one = exits
    else:
        one = time_calls(_exit_calls(runner, x[:1]), repeats, progress, "profile batch 1")
        at_one = tuple(one[f"exit_{k}"] for k in range(num_stages))
    return DeviceProfile(
        host=current_host(), device=runner.device, threads=runner.threads or 0, batch_size=batch_size, engine=runner.engine,
        stages=_differences(exits) if graph else tuple(timed[f"stage_{k}"] for k in range(num_stages)), exits=exits,
        exits_at_one=at_one, full=timed["full"], repeats=repeats,
        providers=tuple(runner.active_providers), onnxruntime=ort.__version__,
    )
