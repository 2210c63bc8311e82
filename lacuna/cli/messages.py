"""User-facing messages of the command line, in one place."""

NO_BIDS_DIR = "BIDS folder not found: {path}. Pass the root of a BIDS dataset as the first argument."
NO_DESCRIPTION = (
    "{path} has no dataset_description.json, so it is not a BIDS dataset. Add one "
    '(at least {{"Name": "...", "BIDSVersion": "1.10.0"}}) at the dataset root.'
)
NO_SUBJECTS = "{path} has no sub-<label> folders. Lesion masks go in sub-<label>/[ses-<label>/]anat/."
NO_MASKS = (
    "no lesion masks selected in {path}: expected files ending in _mask.nii.gz (e.g. "
    "sub-01/anat/sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz); check "
    "--participant-label, --session-label and --mask-label"
)
BIDS_VALIDATION_REPORT = (
    "bids-validator (raw-data rules) does not accept {n} file name(s), e.g. {examples}. "
    "Lesion masks named like derivatives (_space-..._label-..._mask.nii.gz) are expected "
    "here and still processed; use --skip-bids-validation to skip this report."
)
SKIPPED_COMPLETE = "outputs already complete (use --overwrite to recompute)"
DUPLICATE_OUTPUT = "{path} would write the same outputs as {other}; give the masks distinct label- entities"
PARTICIPANT_SUMMARY = "participant level: {total} mask(s): {done} done, {skipped} skipped, {failed} failed"
GROUP_SUMMARY = "group level: {n} mask(s) reduced, {incomplete} incomplete skipped; wrote {files} file(s) to {path}"
OUTPUT_CONTAINS_INPUT = (
    "the output folder {output} is the BIDS folder {bids} or contains it; writing there would "
    "damage the input dataset. Use e.g. {bids}/derivatives/lacuna"
)
NO_FUNCTIONAL_CONNECTOME = (
    "FunctionalNetworkMapping needs a connectome: add --functional-connectome NAME|PATH "
    "(see `lacuna connectomes list`, or fetch one with `lacuna fetch gsp1000`)"
)
