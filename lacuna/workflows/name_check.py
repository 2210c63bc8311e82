"""The participant level's report on the input dataset's file names (``bids-validator``).

The report never gates the run, so it need not delay it: checking names compiles the
validator's few hundred regular expressions (about 0.35 s of Python, holding the GIL).
:class:`NameCheck` runs it on a background thread once the run has reached a step that
leaves the GIL free (a connectome pass), and the run waits for it only at its end.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from lacuna.bids.layout import walk_dataset
from lacuna.workflows import messages

log = logging.getLogger(__name__)


def report_bids_validation(bids_dir: Path, skip: set[Path]) -> list[str]:
    """Check file names with the ``bids-validator`` package; a report, never a gate.

    Returns the relative paths it does not accept (lesion masks named like derivatives
    usually are among them; that is expected and does not stop the run).
    """
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    rejected = []
    for path in walk_dataset(bids_dir, exclude=skip):  # without .bidsignore'd files, nested datasets
        relative = "/" + path.relative_to(bids_dir).as_posix()
        if not validator.is_bids(relative):
            rejected.append(relative)
    if rejected:
        log.warning(messages.BIDS_VALIDATION_REPORT.format(n=len(rejected), examples=", ".join(rejected[:3])))
    else:
        log.info("bids-validator: all file names are valid BIDS")
    return rejected


class NameCheck:
    """:func:`report_bids_validation` of a dataset on a background thread.

    :meth:`start` begins it (once; later calls do nothing); leaving the ``with`` block
    starts it if it was not, and waits for it. A failure of the check is logged, never
    raised: the report is informational.
    """

    def __init__(self, bids_dir: Path, skip: set[Path], enabled: bool = True):
        self._arguments = (bids_dir, skip)
        self._enabled = enabled
        self._thread: threading.Thread | None = None
        self.rejected: list[str] | None = None

    def __enter__(self) -> "NameCheck":
        return self

    def __exit__(self, *exc_info) -> None:
        self.start()
        if self._thread is not None:
            self._thread.join()

    def start(self) -> None:
        """Begin the check on a background thread (when enabled and not begun yet)."""
        if self._enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lacuna-name-check", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.rejected = report_bids_validation(*self._arguments)
        except Exception as exc:  # the report never stops a run
            log.warning("bids-validator could not check the file names: %s", exc)
