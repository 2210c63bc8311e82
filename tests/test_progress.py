"""Per-mask ETAs: the time left at the rate so far, per mask or per group of masks."""

import re

from lacuna.core import timing
from lacuna.core.timing import Progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _seconds_left(text: str) -> float:
    return float(re.fullmatch(r"ETA (\d+) s", text).group(1))


def test_eta_after_every_item_extrapolates_the_rate_so_far(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    progress = Progress(10)
    assert progress.eta_text() == ""  # nothing done yet
    clock.now += 4.0
    progress.done = 2
    assert _seconds_left(progress.eta_text()) == 16  # 2 s per item, 8 left
    progress.done = 10
    assert progress.eta_text() == ""


def test_masks_finishing_in_a_burst_after_a_pass_do_not_inflate_the_eta(monkeypatch):
    """Masks of a group finish together after the group's pass: the first of them,
    10 s into the run, must not give 10 s x 99 masks left."""
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    progress = Progress(100, settle_each=False)
    clock.now += 10.0
    progress.done = 1
    assert progress.eta_text() == ""  # no group done: no rate to go by
    progress.done = 50
    clock.now += 0.5
    progress.settle()  # the first group of 50 took 10.5 s
    clock.now += 9.0  # the second pass runs; its first mask is done
    progress.done = 51
    assert _seconds_left(progress.eta_text()) == 2  # 10.5 s x 2 groups - 19.5 s elapsed
    clock.now += 5.0
    progress.done = 60
    assert progress.eta_text() == "ETA 0 s"  # late, never negative
