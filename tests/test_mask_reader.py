"""The participant level reads groups of masks ahead only when memory allows two, and
runs the per-mask analyses of a group while its pass runs."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest

from lacuna.analysis.base import Analysis
from lacuna.core.provenance import ProvenanceStep
from lacuna.core.results import ScalarMetric
from lacuna.core.spaces import standard_grid
from lacuna.core.subject import SubjectData
from lacuna.workflows.warm_up import AnalysesAhead, MaskReader


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


class _Volume(Analysis):
    """Lesion volume, with the thread it ran on (a stand-in for regional damage)."""

    def __init__(self, fail_for: str = ""):
        self.threads: list[str] = []
        self.fail_for = fail_for

    def parameters(self) -> dict:
        return {"unit": "voxels"}

    def compute(self, subject: SubjectData, step: ProvenanceStep) -> dict:
        self.threads.append(threading.current_thread().name)
        if subject.subject_id == self.fail_for:
            raise ValueError(f"no volume for {subject.subject_id}")
        step.notes.append(f"{subject.n_voxels} voxels")
        return {"volume": ScalarMetric("volume", float(subject.n_voxels), "voxels", "Lesion volume")}


def _subjects(count: int) -> list[SubjectData]:
    grid = standard_grid("MNI152NLin6Asym", 2)
    subjects = []
    for number in range(count):
        data = np.zeros(grid.shape, dtype=np.uint8)
        data[40:42 + number, 50:52, 40:43] = 1
        metadata = {"subject_id": f"{number:02d}", "source_path": f"/data/sub-{number:02d}_mask.nii.gz"}
        subjects.append(SubjectData(nib.Nifti1Image(data, grid.affine), "MNI152NLin6Asym", metadata=metadata))
    return subjects


def test_analyses_run_ahead_give_what_running_them_gives():
    subjects = _subjects(4)
    analysis = _Volume()
    with AnalysesAhead([analysis]) as ahead:
        ahead.start(subjects[:3])
        for _ in range(1000):  # let them run ahead (a mask still queued is run by ``run``)
            if len(analysis.threads) == 3:
                break
            time.sleep(0.005)
        done = [ahead.run(subject) for subject in subjects]
    assert analysis.threads[:3] == ["lacuna-ahead_0"] * 3  # the last was not started: run here
    assert analysis.threads[3] == threading.current_thread().name
    for subject, result in zip(subjects, done):
        expected = _Volume().run(subject)
        assert result.results["_Volume"]["volume"].value == expected.results["_Volume"]["volume"].value
        assert [step.name for step in result.provenance] == [step.name for step in expected.provenance]
        assert result.provenance[-1].notes == expected.provenance[-1].notes
        assert result.provenance[-1].parameters == {"unit": "voxels"}


def test_an_error_of_an_analysis_run_ahead_is_raised_when_its_mask_is_finished():
    subjects = _subjects(2)
    with AnalysesAhead([_Volume(fail_for="01")]) as ahead:
        ahead.start(subjects)
        assert ahead.run(subjects[0]).results["_Volume"]["volume"].value > 0
        with pytest.raises(ValueError, match="no volume for 01"):
            ahead.run(subjects[1])


def test_what_an_earlier_group_left_is_dropped_when_the_next_starts():
    """A mask whose pass failed is never finished; its result run ahead is not kept
    once the next group starts (a cohort's failures would otherwise pile up)."""
    subjects = _subjects(3)
    analysis = _Volume()
    with AnalysesAhead([analysis]) as ahead:
        ahead.start(subjects[:2])
        ahead.run(subjects[0])  # subjects[1] failed in its pass: never finished
        ahead.start(subjects[2:])
        assert list(ahead._pending) == [subjects[2].metadata["source_path"]]
        assert ahead.run(subjects[1]).results["_Volume"]["volume"].value > 0  # run here, if asked
