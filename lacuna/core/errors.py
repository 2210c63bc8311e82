"""The exception hierarchy of Lacuna.

Every error Lacuna raises on purpose derives from :class:`LacunaError`, so callers
(the BIDS App above all) can isolate one failing mask without hiding programming bugs.
Messages name the file concerned and say how to fix the problem.
"""


class LacunaError(Exception):
    """Base class of all errors raised by Lacuna."""


class BidsError(LacunaError):
    """Raised when BIDS dataset operations fail."""


class ValidationError(LacunaError):
    """Raised when an input (mask, atlas, parameter) is not acceptable."""


class SpaceError(ValidationError):
    """Raised for an unknown, unsupported or mismatched coordinate space."""


class ParcellationError(LacunaError):
    """Raised when a parcellation cannot be found, fetched or read."""


class AnalysisError(LacunaError):
    """Raised when an analysis cannot be computed for a subject."""


class DownloadError(LacunaError):
    """Raised when a download fails after its retries."""


class AuthenticationError(DownloadError):
    """Raised when a server refuses the credentials (HTTP 401/403) or none are given."""


class ProcessingError(LacunaError):
    """Raised when converting downloaded data fails."""


# Errors of a BIDS App run as a whole (each has its exit code in lacuna.core.exit_codes).


class UsageError(LacunaError):
    """Raised when options or arguments are wrong (an unknown level, a bad filter file)."""


class UnknownLevelError(UsageError):
    """Raised for an analysis level other than ``participant`` or ``group``."""


class InputNotFoundError(BidsError):
    """Raised when the input folder, or the files the run needs in it, are missing."""


class InvalidDatasetError(BidsError):
    """Raised when the input folder is not a BIDS dataset (no dataset_description.json)."""


class NothingSelectedError(BidsError):
    """Raised when the participant, session or label filters select no mask."""


class OutputError(LacunaError):
    """Raised when an output file or folder cannot be created or written."""


class ReferenceDataError(LacunaError):
    """Raised when reference data (a connectome, a transform) cannot be found or read."""
