"""User-facing messages of the command line, in one place."""

NO_BIDS_DIR = "BIDS folder not found: {path}. Pass the root of a BIDS dataset as the first argument."
NO_DESCRIPTION = (
    "{path} has no dataset_description.json, so it is not a BIDS dataset. Add one "
    '(at least {{"Name": "...", "BIDSVersion": "1.10.0"}}) at the dataset root.'
)
NO_SUBJECTS = "{path} has no sub-<label> folders. Lesion masks go in sub-<label>/[ses-<label>/]anat/."
NO_MASKS = (
    "no lesion masks selected in {path}: it has no files ending in _mask.nii.gz (e.g. "
    "sub-01/anat/sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz); masks kept as a "
    "derivative dataset are read with --derivatives DIR"
)
NO_DERIVATIVES = (
    "--derivatives {path}: not a BIDS derivative dataset (no dataset_description.json); "
    "pass the root of the dataset that holds the lesion masks"
)
BIDS_VALIDATION_REPORT = (
    "bids-validator (raw-data rules) does not accept {n} file name(s), e.g. {examples}. "
    "Lesion masks named like derivatives (_space-..._label-..._mask.nii.gz) are expected "
    "here and still processed; use --skip-bids-validation to skip this report."
)
SKIPPED_COMPLETE = "outputs already complete (use --overwrite to recompute)"
DUPLICATE_OUTPUT = "{path} would write the same outputs as {other}; give the masks distinct label- entities"
PARTICIPANT_SUMMARY = "participant level: {total} mask(s): {done} done, {skipped} skipped, {failed} failed"
GROUP_SUMMARY = (
    "group level: {n} mask(s) reduced, {incomplete} incomplete skipped, {failed} failed at the participant "
    "level (see group/summary.json); wrote {files} file(s) to {path}"
)
OUTPUT_CONTAINS_INPUT = (
    "the output folder {output} is the BIDS folder {bids} or contains it; writing there would "
    "damage the input dataset. Use e.g. {bids}/derivatives/lacuna"
)
NO_FUNCTIONAL_CONNECTOME = (
    "FunctionalNetworkMapping needs a connectome: add --functional-connectome NAME|PATH "
    "(see `lacuna connectomes list`, or fetch one with `lacuna fetch gsp1000`)"
)
UNKNOWN_LEVEL = "unknown analysis level {level!r}: the third argument must be 'participant' or 'group'"
UNEXPECTED_ERROR = (
    "unexpected error ({kind}: {error}). This is a bug in Lacuna: run again with -v for the "
    "details and report them at https://github.com/lacuna-neuro/lacuna/issues"
)
NOTHING_SELECTED = (
    "no lesion masks selected: {selection} matches none of the masks in {path} (found masks "
    "of {available}); check the labels"
)
UNMATCHED_FILTER = "{option} {value} matches no mask in {path} (masks found for {option}: {available}); ignored"
UNWRITABLE = (
    "cannot write to {path}: {reason}. Choose an output folder you can write to (or make it "
    "writable, e.g. chmod u+w), and check the file system is not read-only or full"
)


def error_text(exc: BaseException) -> str:
    """One line for an error that ends a run: the file or folder concerned and the fix."""
    if isinstance(exc, OSError) and not str(exc).startswith("[Errno") and exc.filename is None:
        return str(exc)
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in (28, 30)  # ENOSPC, EROFS
    ):
        return UNWRITABLE.format(path=exc.filename or "the output folder", reason=exc.strerror or exc)
    if isinstance(exc, FileNotFoundError):
        return f"not found: {exc.filename or exc}. Check the path (relative paths start from the current folder)"
    if isinstance(exc, OSError):
        return f"{exc.filename or 'a file'}: {exc.strerror or exc}"
    return str(exc)
MASK_TRANSFORM_WITHOUT_SPACE = (
    "--mask-transform needs --mask-space: name the space the transform maps the masks into "
    "(e.g. --mask-space MNI152NLin2009cAsym)"
)
