"""Exit codes of the command line, in one place.

They follow the BIDS execution specification (bids-standard/execution-spec, "Exit
codes"): 0 success, 1 failure (for Lacuna: some masks failed, the others were
written), 16-19 BIDS-related, 64-78 from BSD ``sysexits(3)``. Code 2 is reserved
(Bash sets it) and never used for Lacuna's own errors.
"""

from __future__ import annotations

import errno
from enum import IntEnum

from lacuna.core import errors


class ExitCode(IntEnum):
    """Exit status of ``lacuna`` and what it means."""

    SUCCESS = 0  #: every selected mask succeeded
    FAILURE = 1  #: some masks failed (their reasons are summarised), or an unexpected error
    INVALID_BIDS = 16  #: the input folder is not a BIDS dataset
    UNKNOWN_LEVEL = 17  #: the analysis level is neither participant nor group
    NOTHING_SELECTED = 18  #: --participant-label, --session-label or another filter selected no mask
    USAGE = 64  #: wrong options or arguments
    DATA_ERROR = 65  #: an input is incorrect (e.g. a grid that differs from its declared space)
    NO_INPUT = 66  #: an input folder or file is missing or unreadable
    CANNOT_CREATE = 73  #: an output file or folder cannot be created
    IO_ERROR = 74  #: reading or writing failed midway
    TEMPORARY_FAILURE = 75  #: a download failed; a later run is expected to succeed


#: Exception classes and their exit codes; the most specific class listed wins.
_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (errors.UnknownLevelError, ExitCode.UNKNOWN_LEVEL),
    (errors.NothingSelectedError, ExitCode.NOTHING_SELECTED),
    (errors.InvalidDatasetError, ExitCode.INVALID_BIDS),
    (errors.InputNotFoundError, ExitCode.NO_INPUT),
    (errors.AuthenticationError, ExitCode.USAGE),
    (errors.DownloadError, ExitCode.TEMPORARY_FAILURE),
    (errors.ParcellationError, ExitCode.NO_INPUT),
    (errors.ReferenceDataError, ExitCode.NO_INPUT),
    (errors.OutputError, ExitCode.CANNOT_CREATE),
    (errors.UsageError, ExitCode.USAGE),
    (errors.ValidationError, ExitCode.USAGE),
    (errors.BidsError, ExitCode.DATA_ERROR),
    (FileNotFoundError, ExitCode.NO_INPUT),
    (PermissionError, ExitCode.CANNOT_CREATE),
    (OSError, ExitCode.IO_ERROR),
)


#: Errors of the file system that mean "cannot create the output" whatever their class.
_CANNOT_CREATE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an error that ends a run (:data:`ExitCode.FAILURE` when unknown)."""
    if isinstance(exc, OSError) and exc.errno in _CANNOT_CREATE_ERRNOS:
        return ExitCode.CANNOT_CREATE
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return ExitCode.FAILURE


def table_markdown() -> str:
    """The exit codes as a Markdown table (kept in the README)."""
    rows = ["| Code | Meaning |", "| --- | --- |"]
    for code in ExitCode:
        rows.append(f"| {int(code)} | {_MEANINGS[code]} |")
    return "\n".join(rows)


_MEANINGS = {
    ExitCode.SUCCESS: "success: every selected mask was analysed (or already complete)",
    ExitCode.FAILURE: (
        "some masks failed; the others were written (reasons in the summary, `logs/` and `group/summary.json`)"
    ),
    ExitCode.INVALID_BIDS: "the input folder is not a BIDS dataset (no `dataset_description.json`)",
    ExitCode.UNKNOWN_LEVEL: "unknown analysis level (use `participant` or `group`)",
    ExitCode.NOTHING_SELECTED: "the participant, session, label or filter-file selection matched no mask",
    ExitCode.USAGE: "wrong options or arguments",
    ExitCode.DATA_ERROR: "an input is incorrect as a whole (the message names the file)",
    ExitCode.NO_INPUT: "an input folder or file is missing (the BIDS folder, an atlas, the participant outputs)",
    ExitCode.CANNOT_CREATE: "an output file or folder cannot be created (permissions, read-only file system)",
    ExitCode.IO_ERROR: "reading or writing failed midway (disk full, I/O error)",
    ExitCode.TEMPORARY_FAILURE: "a download failed; running again later is expected to succeed",
}
