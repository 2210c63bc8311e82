"""The participant level reads groups of masks ahead only when memory allows two."""

from __future__ import annotations

from lacuna.workflows.warm_up import MaskReader


def _recorder():
    """A ``prepare`` that records the groups it was asked for, in order."""
    started = []

    def prepare(group):
        started.append(group)
        return group

    return started, prepare


def test_reading_ahead_starts_the_next_group_before_it_is_taken():
    started, prepare = _recorder()
    groups = [["a"], ["b"], ["c"]]
    with MaskReader(groups, prepare, ahead=True) as reader:
        assert reader.take() == ["a"]
        reader.read_next()
        reader.read_next()  # one group ahead at most
        assert reader.take() == ["b"]
        assert started == [["a"], ["b"]]
        assert reader.take() == ["c"]


def test_without_reading_ahead_a_group_is_read_only_when_taken():
    started, prepare = _recorder()
    groups = [["a"], ["b"]]
    with MaskReader(groups, prepare, ahead=False) as reader:
        assert reader.take() == ["a"]
        reader.read_next()
        assert started == [["a"]]  # "b" not started: its masks are not held meanwhile
        assert reader.take() == ["b"]
