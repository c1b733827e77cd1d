"""Runtime under load: 10,000 mixed requests through CascadeRunner.predict, memory measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime import CascadeRunner, InputError
from handmade import reference_cascade

REQUESTS = 10_000
WARMUP = 500
INVALID_RATE = 0.05
TIE_MARGIN = 1e-4


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this platform")


def invalid_request(rng: np.random.Generator, good: np.ndarray) -> np.ndarray:
    """One of the ways a caller gets a batch wrong."""
    kind = rng.integers(4)
    if kind == 0:
        bad = good.copy()
        bad[rng.integers(len(bad)), 0, 0, 0] = np.nan
        return bad
    if kind == 1:
        return good[:, :, :8]
    if kind == 2:
        return good.astype(np.float64)
    return good[:0]


@pytest.mark.slow
def test_ten_thousand_mixed_requests(tiny_bundle, digits_test):
    rng = np.random.default_rng(0)
    real = digits_test[0]
    noisy = real[rng.integers(len(real), size=730)] + rng.normal(0, 0.5, (730, *real.shape[1:])).astype(np.float32)
    pool = np.concatenate([real, noisy])
    runner = CascadeRunner(tiny_bundle, threads=1)
    one_by_one = [runner.predict(pool[i : i + 1]) for i in range(len(pool))]
    single_pred = np.array([r.predictions[0] for r in one_by_one])
    single_exit = np.array([r.exit_index[0] for r in one_by_one])
    # inputs whose confidence is within TIE_MARGIN of the threshold may exit elsewhere in another batch size
    _, _, margin = reference_cascade(runner.policies[0].name, runner.thresholds, {}, *runner.stage_outputs(pool))
    clear = margin > TIE_MARGIN
    assert clear.mean() >= 0.95

    answered = rejected = invalid = 0
    rss_start = None
    for request in range(REQUESTS):
        if request == WARMUP:
            rss_start = rss_mb()
        index = rng.integers(len(pool), size=rng.integers(1, 65))
        if rng.random() < INVALID_RATE:
            invalid += 1
            with pytest.raises(InputError):
                runner.predict(invalid_request(rng, pool[index]))
            rejected += 1
            continue
        result = runner.predict(pool[index])
        keep = clear[index]
        np.testing.assert_array_equal(result.predictions[keep], single_pred[index][keep])
        np.testing.assert_array_equal(result.exit_index[keep], single_exit[index][keep])
        answered += 1
    rss_end = rss_mb()
    print(f"\nsoak: {answered} answered, {rejected}/{invalid} invalid rejected; RSS {rss_start:.1f} MB after {WARMUP} warm-up requests -> {rss_end:.1f} MB at the end")
    assert answered + rejected == REQUESTS
    assert rss_end - rss_start < 50, f"RSS grew {rss_end - rss_start:.1f} MB"
