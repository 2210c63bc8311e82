"""Command-line options of group inference (names fixed by ../shared/spec/group-level.md)."""

from __future__ import annotations

from pathlib import Path

import click

#: Options of group inference that take several values (``--covariate age lesion_volume``).
MULTI_VALUE_GROUP_OPTIONS = ("--cases", "--controls", "--covariate")

_OPTIONS = (
    click.option(
        "--participants-file",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="TSV",
        help="Group: table with a participant_id column (sub-<label>) and optional session_id. "
        "Default: BIDS_DIR/participants.tsv.",
    ),
    click.option(
        "--network-threshold",
        type=click.FloatRange(min=0),
        default=7.0,
        show_default=True,
        metavar="T",
        help="Group: threshold on the absolute value of each fLNM t map (sensitivity, Liebermeister).",
    ),
    click.option(
        "--disconnection-threshold",
        type=click.FloatRange(min=0),
        default=0.05,
        show_default=True,
        metavar="F",
        help="Group: threshold on each sLNM disconnection map (fraction of streamlines).",
    ),
    click.option(
        "--cases-column",
        metavar="COL",
        help="Group: column of the participants table for the case/control contrast (specificity, Liebermeister).",
    ),
    click.option(
        "--cases",
        "cases",
        multiple=True,
        metavar="VALUE",
        help="Group: value of --cases-column that marks a case (repeatable).",
    ),
    click.option(
        "--controls",
        "controls",
        multiple=True,
        metavar="VALUE",
        help="Group: value of --cases-column that marks a control (repeatable). Default: every other value.",
    ),
    click.option("--score-column", metavar="COL", help="Group: continuous score for the association analysis."),
    click.option(
        "--covariate",
        "covariates",
        multiple=True,
        metavar="COL",
        help="Group: nuisance column of the participants table (repeatable); lesion_volume is each "
        "mask's lesion volume in mm^3 from the participant outputs.",
    ),
    click.option(
        "--n-permutations",
        type=click.IntRange(min=0),
        default=5000,
        show_default=True,
        metavar="N",
        help="Group: permutations for family-wise error (0: parametric statistics only).",
    ),
    click.option("--tfce", is_flag=True, help="Group: also threshold-free cluster enhancement (E=0.5, H=2, faces connectivity)."),
    click.option("--random-seed", type=int, default=0, show_default=True, metavar="N", help="Group: seed of the permutations."),
)


def group_inference_options(command):
    """Add the group-inference options to a click command."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
