"""Command line: ``lacuna BIDS_DIR OUTPUT_DIR {participant,group} [options]`` and tools.

The BIDS-App form is the default command; other commands (``lacuna atlases list``,
``lacuna validate``, ``lacuna demo``) live beside it. The CLI only wires options to
the API.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from lacuna._version import __version__
from lacuna.workflows import messages
from lacuna.workflows.config import ANALYSES, DEFAULT_ANALYSES, DEFAULT_ATLASES, RunConfig
from lacuna.cli.fetch_commands import connectomes_status, fetch
from lacuna.cli.logs import setup_logging
from lacuna.cli.group_options import MULTI_VALUE_GROUP_OPTIONS, group_inference_options
from lacuna.core.errors import LacunaError, UnknownLevelError, UsageError
from lacuna.core.space_names import ACCEPTED_SPACES
from lacuna.core.exit_codes import ExitCode, exit_code_for
from lacuna.core.threads import configure_threads, library_pools_not_started

log = logging.getLogger("lacuna")

#: Options that take several values; ``--atlas A B`` is accepted as ``--atlas A --atlas B``.
MULTI_VALUE_OPTIONS = (
    "--participant-label",
    "--participant_label",
    "--session-label",
    "--session_label",
    "--mask-label",
    "--mask_label",
    "--atlas",
    "--analysis",
    "--functional-connectome",
    "--tractogram",
    *MULTI_VALUE_GROUP_OPTIONS,
)
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LEVELS = ("participant", "group")


def expand_multi_value_options(args: list[str]) -> list[str]:
    """Rewrite ``--opt a b`` as ``--opt a --opt b`` for :data:`MULTI_VALUE_OPTIONS`.

    BIDS Apps (and Boutiques) pass lists space-separated. Extra values are taken while
    they look like labels: not an option, not an analysis level, not an existing path.
    """
    expanded: list[str] = []
    current = None  # the multi-value option whose values are being read
    has_value = False
    for token in args:
        if token in MULTI_VALUE_OPTIONS:
            current, has_value = token, False
        elif current and not has_value:
            has_value = True
        elif current and _LABEL_VALUE.match(token) and token not in _LEVELS and not os.path.exists(token):
            expanded.append(current)
        else:
            current = None
        expanded.append(token)
    return expanded


@contextmanager
def _usage_exit_code() -> Iterator[None]:
    """Give click's usage errors (unknown option, missing argument, bad value) the exit
    code of the BIDS execution specification (64) instead of click's 2."""
    try:
        yield
    except click.UsageError as exc:
        exc.exit_code = int(ExitCode.USAGE)
        raise


@contextmanager
def _without_traceback() -> Iterator[None]:
    """Turn an error no command handled into one line on stderr and its exit code, so
    that no traceback reaches a user (``-v`` logs it)."""
    try:
        yield
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
        raise
    except (LacunaError, OSError) as exc:
        log.debug("error that ended the command", exc_info=exc)
        click.echo(f"Error: {messages.error_text(exc)}", err=True)
        sys.exit(exit_code_for(exc))
    except Exception as exc:
        log.debug("unexpected error", exc_info=exc)
        click.echo(f"Error: {messages.UNEXPECTED_ERROR.format(kind=type(exc).__name__, error=exc)}", err=True)
        sys.exit(ExitCode.FAILURE)


class BidsAppGroup(click.Group):
    """A group whose default command is the BIDS App (positional form)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        positional = next((a for a in args if not a.startswith("-")), None)
        if positional is not None and positional not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def make_context(self, *args, **kwargs) -> click.Context:
        with _usage_exit_code():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _usage_exit_code(), _without_traceback():
            return super().invoke(ctx)

    def format_usage(self, ctx, formatter):
        formatter.write("Usage: lacuna BIDS_DIR OUTPUT_DIR {participant,group} [OPTIONS]\n")
        formatter.write("       lacuna COMMAND [ARGS]...\n")


@click.group(
    cls=BidsAppGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="lacuna")
def cli():
    """Lacuna: lesion network mapping as a BIDS App.

    \b
    Map binary lesion masks (MNI152NLin6Asym / MNI152NLin2009cAsym) onto parcellations
    and normative connectomes, and write BIDS derivatives.

    \b
    Typical use:
      lacuna /data/bids /data/bids/derivatives/lacuna participant --atlas Schaefer2018_400Parcels7Networks
      lacuna /data/bids /data/bids/derivatives/lacuna group
      lacuna demo ./lacuna-demo            # synthetic example, runs offline

    See `lacuna run --help` for every option of the BIDS-App form.
    """


@cli.command("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bids_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("analysis_level", metavar="{participant,group}")
@click.option(
    "--participant-label",
    "--participant_label",
    "participant_labels",
    multiple=True,
    metavar="LABEL",
    help="Participant(s) to analyse, with or without 'sub-' (repeatable; space-separated lists work). Default: all.",
)
@click.option(
    "--session-label",
    "--session_label",
    "session_labels",
    multiple=True,
    metavar="LABEL",
    help="Session(s) to analyse, with or without 'ses-' (repeatable). Default: all.",
)
@click.option(
    "--mask-label",
    "--mask_label",
    "mask_labels",
    multiple=True,
    metavar="LABEL",
    help="Mask label(s) to use: the label- entity of the masks, e.g. acuteinfarct (repeatable). Default: all masks.",
)
@click.option(
    "--bids-filter-file",
    "--bids_filter_file",
    "bids_filter_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help='JSON file selecting masks by their entities, as fMRIPrep\'s: {"mask": {"session": "01", '
    '"acquisition": ["flair", null]}} (null: the entity must be absent).',
)
@click.option(
    "--derivatives",
    "derivatives",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="DIR",
    help="A BIDS derivative dataset holding lesion masks, read besides BIDS_DIR (repeatable).",
)
@click.option(
    "--mask-space",
    type=click.Choice(ACCEPTED_SPACES),
    help="Space of the masks (overrides their file names and sidecars); with --mask-transform, the "
    "space the transform maps into. The ICBM 2009 family is analysed as MNI152NLin2009cAsym.",
)
@click.option(
    "--mask-transform",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="ITK/ANTs transform (.mat, .txt, .h5, or a displacement-field .nii.gz) from --mask-space to "
    "the masks' own space, as antsApplyTransforms uses it with the template as reference: each mask "
    "is moved with it onto the template grid.",
)
@click.option(
    "--output-space",
    type=click.Choice(["input", "analysis"]),
    default="input",
    show_default=True,
    help="Space of voxel maps: the mask's own space and grid (input) or the analysis' space, e.g. "
    "the connectome grid (analysis). Parcel-level tables are the same either way.",
)
@click.option(
    "--analysis",
    "analyses",
    multiple=True,
    type=click.Choice(ANALYSES, case_sensitive=False),
    help="Analysis to run (repeatable). Default: RegionalDamage; FunctionalNetworkMapping also runs "
    "whenever --functional-connectome is given.",
)
@click.option(
    "--functional-connectome",
    "functional_connectomes",
    multiple=True,
    metavar="NAME|PATH",
    help="Normative functional connectome for functional LNM: a registered name (e.g. GSP1000) or "
    "an HDF5 file/folder (repeatable; one set of outputs per connectome).",
)
@click.option(
    "--tractogram",
    "tractograms",
    multiple=True,
    metavar="NAME|PATH",
    help="Normative tractogram for structural LNM (disconnection): a registered name or a .tck/.trk "
    "file whose space is registered or in a sidecar <stem>.json (\"SpatialReference\") "
    "(repeatable; one set of outputs per connectome).",
)
@click.option(
    "--flnm-method",
    type=click.Choice(["boes", "pini"]),
    default="boes",
    show_default=True,
    help="Seed of functional LNM: mean of all lesion voxels (boes) or of the voxels loading most on "
    "the lesion's first principal component (pini).",
)
@click.option(
    "--mem",
    "mem_gb",
    type=click.FloatRange(min=0.1),
    help="Memory budget in GB for functional mapping (lesions per connectome pass). Default: half "
    "the available memory.",
)
@click.option(
    "--atlas",
    "atlases",
    multiple=True,
    metavar="NAME",
    help=f"Parcellation(s) for regional outputs (repeatable; see `lacuna atlases list`). Default: {', '.join(DEFAULT_ATLASES)}.",
)
@click.option(
    "--atlas-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of TemplateFlow-style atlas files (tpl-<space>_res-<NN>_atlas-<A>_desc-<D>_dseg.nii.gz + labels .txt/.tsv).",
)
@click.option("-w", "--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Folder for the run settings and temporary files.")
@click.option("--nprocs", type=click.IntRange(min=1), default=1, show_default=True, help="Masks processed in parallel (processes).")
@click.option(
    "--nthreads",
    "--n_cpus",
    "--n-cpus",
    "nthreads",
    type=click.IntRange(min=1),
    help="Most threads of the whole run, all processes together (as fMRIPrep's --nthreads). Default: the usable CPUs.",
)
@click.option(
    "--omp-nthreads",
    "--omp_nthreads",
    "omp_nthreads",
    type=click.IntRange(min=1),
    help="Most threads per process (Lacuna's thread pools, BLAS, OpenMP). Default: --nthreads / --nprocs, "
    "else $LACUNA_NUM_THREADS, else the usable CPUs.",
)
@click.option(
    "--skip-bids-validation",
    "--skip_bids_validation",
    "--skip_bids_validator",
    "--skip-bids-validator",
    "skip_bids_validation",
    is_flag=True,
    help="Do not report file names the bids-validator package rejects.",
)
@click.option("--overwrite", is_flag=True, help="Recompute masks whose outputs are already complete.")
@group_inference_options
@click.option("-v", "--verbose", count=True, help="Debug log output.")
@click.option("-q", "--quiet", count=True, help="Only warnings (-qq: only errors).")
def run_command(bids_dir, output_dir, analysis_level, verbose, quiet, analyses, atlases, **options):
    """Run the BIDS App: BIDS_DIR OUTPUT_DIR {participant,group}.

    \b
    participant  analyse each selected lesion mask and write its derivatives
                 (masks with complete outputs are skipped unless --overwrite);
    group        reduce the participant outputs in OUTPUT_DIR to group tables,
                 lesion-overlap maps and a summary (never recomputes analyses).
    """
    setup_logging(verbose, quiet)
    if analysis_level not in _LEVELS:
        _exit_with(UnknownLevelError(messages.UNKNOWN_LEVEL.format(level=analysis_level)))
    if options.get("mask_transform") and not options.get("mask_space"):
        _exit_with(UsageError(messages.MASK_TRANSFORM_WITHOUT_SPACE))
    canonical = {name.lower(): name for name in ANALYSES}
    config = RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=analysis_level,
        analyses=tuple(dict.fromkeys(canonical[a.lower()] for a in analyses)) or DEFAULT_ANALYSES,
        atlases=tuple(dict.fromkeys(atlases)) or DEFAULT_ATLASES,
        **{
            **options,
            "functional_connectomes": tuple(dict.fromkeys(options["functional_connectomes"])),
            "tractograms": tuple(dict.fromkeys(options["tractograms"])),
        },
    )
    try:
        threads = configure_threads(config.nprocs, config.nthreads, config.omp_nthreads)
        log.debug("%d process(es), %d thread(s) per process", config.nprocs, threads)
        if analysis_level == "participant":
            _run_participant(config)
        else:
            _run_group(config)
    except (LacunaError, OSError) as exc:
        _exit_with(exc)
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        log.debug("unexpected error", exc_info=True)
        log.error("%s", messages.UNEXPECTED_ERROR.format(kind=type(exc).__name__, error=exc))
        sys.exit(ExitCode.FAILURE)


def _exit_with(exc: BaseException) -> None:
    """Log the one-line message of an error that ends the run; exit with its code."""
    log.debug("error that ended the run", exc_info=exc)
    log.error("%s", messages.error_text(exc))
    sys.exit(exit_code_for(exc))


def _run_participant(config: RunConfig) -> None:
    library_pools_not_started()  # the participant level runs them single-threaded
    from lacuna.core.memory import reuse_freed_memory, use_one_heap
    from lacuna.workflows.participant import run_participant
    from lacuna.core.atomic import write_json

    use_one_heap()  # before the run starts its threads: freed memory can go back between passes
    reuse_freed_memory()  # and is reused, not faulted in again, within a pass's lesions

    if config.work_dir:
        write_json(config.work_dir / "lacuna_participant_config.json", config.to_dict())
    summary = run_participant(config)
    click.echo(summary.text())
    if summary.failed:
        sys.exit(ExitCode.FAILURE)


def _run_group(config: RunConfig) -> None:
    from lacuna.workflows.group import run_group

    from lacuna.bids.group_options import InferenceOptions

    summary = run_group(
        config.output_dir, config.participant_labels, config.session_labels, config.mask_labels,
        inference=InferenceOptions.from_config(config),
    )
    click.echo(
        messages.GROUP_SUMMARY.format(
            n=len(summary.masks),
            incomplete=len(summary.incomplete),
            failed=len(summary.failed),
            files=len(summary.written),
            path=config.output_dir,
        )
    )


@cli.group()
def atlases():
    """List, fetch and register parcellations."""


@atlases.command("list")
@click.option("--atlas-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Also list atlases in this folder.")
def atlases_list(atlas_dir):
    """List the parcellations Lacuna knows (catalogue, registered, --atlas-dir)."""
    from lacuna.resources.parcellations import list_parcellations

    for info in list_parcellations(atlas_dir=atlas_dir):
        cached = "cached" if info.cached else "not cached"
        click.echo(f"{info.name:45s} {info.space:22s} {info.source:10s} {cached}")


@atlases.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Every parcellation of the catalogue.")
@click.option("-v", "--verbose", count=True)
def atlases_fetch(names, fetch_all, verbose):
    """Download catalogue parcellations into the data cache (LACUNA_ATLAS_URL for a mirror)."""
    from lacuna.resources.parcellations import CATALOGUE, get_parcellation

    setup_logging(verbose, 0)
    if fetch_all:
        names = tuple(CATALOGUE)
    if not names:
        raise click.UsageError("name the parcellations to fetch, or pass --all")
    try:
        for name in names:
            parcellation = get_parcellation(name)
            click.echo(f"{name}: {parcellation.image_path}")
    except LacunaError as exc:
        raise click.ClickException(str(exc)) from exc


@atlases.command("register")
@click.argument("name")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labels file (names per line, 'id name' lines, or TSV with index/name).",
)
@click.option("--space", required=True, type=click.Choice(["MNI152NLin6Asym", "MNI152NLin2009cAsym", "MNI152NLin2009aAsym"]))
@click.option("--citation", default="", help="How to cite the atlas.")
@click.option("--overwrite", is_flag=True, help="Replace an existing registration of NAME.")
def atlases_register(name, image, labels, space, citation, overwrite):
    """Register your own parcellation IMAGE under NAME (<atlas> or <atlas>_<desc>)."""
    from lacuna.resources.parcellations import register_parcellation

    try:
        parcellation = register_parcellation(name, image, labels, space=space, citation=citation, overwrite=overwrite)
    except (LacunaError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"registered {parcellation.name} ({parcellation.space}): {parcellation.image_path}")


@cli.group()
def transforms():
    """TemplateFlow transforms between MNI152NLin6Asym and MNI152NLin2009cAsym."""


@transforms.command("fetch")
@click.option("-v", "--verbose", count=True)
def transforms_fetch(verbose):
    """Download both transforms into the data cache (LACUNA_TEMPLATEFLOW_URL for a mirror),
    so that runs across spaces need no network."""
    from lacuna.resources.templates import transform_path

    setup_logging(verbose, 0)
    try:
        for source, target in (("MNI152NLin6Asym", "MNI152NLin2009cAsym"), ("MNI152NLin2009cAsym", "MNI152NLin6Asym")):
            click.echo(f"{source} -> {target}: {transform_path(source, target)}")
    except LacunaError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.group()
def connectomes():
    """List, register and remove normative connectomes."""


@connectomes.command("list")
def connectomes_list():
    """List registered connectomes."""
    from lacuna.resources.connectomes import list_connectomes

    found = list_connectomes()
    if not found:
        click.echo("no connectome registered (see `lacuna connectomes register --help`)")
    for connectome in found:
        resolution = f"{connectome.resolution:g} mm" if connectome.resolution else ""
        subjects = f"{connectome.n_subjects} subjects" if connectome.n_subjects else ""
        click.echo(f"{connectome.name:12s} {connectome.kind:10s} {connectome.space:20s} {resolution:6s} {subjects:14s} {connectome.path}")


@connectomes.command("register")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--space", required=True, type=click.Choice(["MNI152NLin6Asym", "MNI152NLin2009cAsym"]))
@click.option("--resolution", type=float, help="Voxel size in mm (functional connectomes).")
@click.option("--n-subjects", type=int, help="Number of subjects (checked for functional connectomes).")
@click.option("--description", default="")
@click.option("--citation", default="")
@click.option("--force", is_flag=True, help="Replace an existing registration of NAME.")
def connectomes_register(name, path, space, resolution, n_subjects, description, citation, force):
    """Register PATH under NAME: an HDF5 functional connectome (file or folder of batch
    files, needs --resolution) or a .tck/.trk tractogram (structural)."""
    from lacuna.resources import connectomes as registry

    try:
        if path.suffix in (".tck", ".trk"):
            registered = registry.register_structural_connectome(
                name, path, space, n_subjects=n_subjects, description=description, citation=citation, overwrite=force
            )
        else:
            if resolution is None:
                raise click.UsageError("--resolution is needed for a functional connectome")
            registered = registry.register_functional_connectome(
                name, path, space, resolution, n_subjects=n_subjects, description=description, citation=citation, overwrite=force
            )
    except (LacunaError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"registered {registered.kind} connectome {registered.name}: {registered.path}")


@connectomes.command("remove")
@click.argument("name")
def connectomes_remove(name):
    """Remove the registration NAME (files are kept)."""
    from lacuna.resources.connectomes import unregister_connectome

    try:
        unregister_connectome(name)
    except LacunaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed {name}")


@cli.command()
@click.argument("derivatives_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def validate(derivatives_dir):
    """Check a Lacuna derivatives folder against Lacuna's bundled schema."""
    from lacuna.bids.validation import validate_bids_derivatives

    report = validate_bids_derivatives(derivatives_dir, raise_on_error=False)
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}")
    for error in report["errors"]:
        click.echo(f"error: {error}")
    click.echo(f"{len(report['errors'])} error(s), {len(report['warnings'])} warning(s)")
    if report["errors"]:
        sys.exit(1)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--nprocs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", count=True)
def demo(out_dir, nprocs, verbose, quiet):
    """Generate a small synthetic BIDS dataset in OUT_DIR and run Lacuna on it, offline.

    Writes OUT_DIR/bids (synthetic lesions), OUT_DIR/atlases (a synthetic
    parcellation, clearly named as such), and OUT_DIR/derivatives/lacuna, then runs
    participant and group levels and validates the outputs.
    """
    from lacuna.workflows.demo import run_demo

    setup_logging(verbose, quiet)
    try:
        report = run_demo(out_dir, nprocs=nprocs)
    except LacunaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report)


# Commands defined in their own modules.
cli.add_command(fetch)
connectomes.add_command(connectomes_status, "status")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    try:
        cli.main(args=args, prog_name="lacuna")
    finally:
        # The process ends now: spare the interpreter's last garbage collection the
        # hundreds of thousands of objects the numerical libraries leave (0.1-0.2 s).
        gc.freeze()


if __name__ == "__main__":
    main()
