"""``lacuna fetch`` and ``lacuna connectomes status``: normative connectomes in one command.

``lacuna fetch gsp1000 --api-key KEY`` downloads, verifies, unpacks, converts and
registers GSP1000 (likewise ``dtor985`` and ``hcp1065``); running it again after an
interruption resumes. Progress goes to stderr: one redrawn line on a terminal, plain
lines (a new step, or every 30 s) otherwise; the summary goes to stdout.

:mod:`lacuna.cli.main` adds both commands to the CLI.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from lacuna.cli.logs import setup_logging
from lacuna.core.errors import AuthenticationError, LacunaError
from lacuna.net.disk import format_bytes
from lacuna.resources.fetching.records import FetchConfig, FetchProgress, FetchResult
from lacuna.resources.fetching.sources import SOURCE_NAMES

log = logging.getLogger(__name__)

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ProgressPrinter:
    """A ``progress_callback`` that shows :class:`FetchProgress` on a stream.

    Parameters
    ----------
    stream : file, optional
        Where to write (default: stderr).
    interactive : bool, optional
        Redraw one line with ``\\r`` (default: whether the stream is a terminal);
        otherwise print plain lines.
    interval : float, optional
        Minimum seconds between two updates of the same step (default 0.2 on a
        terminal, 30 otherwise); a new step is always shown at once.
    """

    def __init__(self, stream=None, interactive: bool | None = None, interval: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval = interval if interval is not None else (0.2 if interactive else 30.0)
        self._last_key = None
        self._last_time = 0.0
        self._width = 0

    def __call__(self, progress: FetchProgress) -> None:
        key = (progress.phase, progress.current_file, progress.message)
        now = time.monotonic()
        if key == self._last_key and now - self._last_time < self.interval:
            return
        new_step = key != self._last_key
        self._last_key, self._last_time = key, now
        line = format_progress(progress)
        if self.interactive:
            if new_step and self._width:
                self.stream.write("\n")
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a redrawn line."""
        if self.interactive and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0


def format_progress(progress: FetchProgress) -> str:
    """One line describing ``progress``."""
    parts = [f"[{progress.phase}]", progress.message or progress.current_file]
    if progress.bytes_total:
        parts.append(
            f"{progress.download_percent:5.1f}% ({format_bytes(progress.bytes_transferred)} of "
            f"{format_bytes(progress.bytes_total)})"
        )
    elif progress.bytes_transferred:
        parts.append(format_bytes(progress.bytes_transferred))
    if progress.files_total > 1:
        parts.append(f"[{min(progress.files_completed + 1, progress.files_total)}/{progress.files_total}]")
    return " ".join(part for part in parts if part)


def _status_word(status: dict) -> str:
    for key in ("registered", "processed", "downloaded"):
        if status[key]:
            return key
    return "not fetched"


def _print_sources() -> None:
    from lacuna.resources.fetching.status import get_fetch_status, list_fetchable_connectomes

    click.echo(f"{'NAME':9s} {'TYPE':11s} {'SPACE':20s} {'SUBJECTS':>8s} {'SIZE':>8s}  {'SOURCE':10s} STATUS")
    for source in list_fetchable_connectomes():
        status = _status_word(get_fetch_status(source.name))
        click.echo(
            f"{source.name:9s} {source.type:11s} {source.space:20s} {source.n_subjects:8d} "
            f"{'~' + format(source.estimated_size_gb, 'g') + ' GB':>8s}  {source.source_type:10s} {status}"
        )
    click.echo(
        "\nFetch one with `lacuna fetch NAME` (gsp1000 needs a Harvard Dataverse API token, dtor985 "
        "a Figshare token: --api-key, or DATAVERSE_API_KEY / FIGSHARE_API_KEY)."
    )


def _check_options(source, options: dict) -> None:
    """Refuse options that do not apply to ``source`` (never ignore one silently)."""
    functional_only = ("batches", "test_mode", "skip_checksum")
    for option in functional_only:
        if options[option] and source.type != "functional":
            raise click.UsageError(f"--{option.replace('_', '-')} applies to gsp1000 only")
    for option in ("api_key", "save_key"):
        if options[option] and source.source_type not in ("dataverse", "figshare"):
            raise click.UsageError(f"--{option.replace('_', '-')}: {source.name} needs no API key")
    if options["no_keep_original"] and source.type != "structural":
        raise click.UsageError("--no-keep-original applies to dtor985 and hcp1065 only")
    if options["save_key"] and not options["api_key"]:
        raise click.UsageError("--save-key stores the key given with --api-key; give one")


def _save_key(source, api_key: str) -> None:
    from lacuna.net.credentials import SERVICE_OF_SOURCE, save_api_key

    path = save_api_key(SERVICE_OF_SOURCE[source.name], api_key)
    click.echo(f"saved the API key to {path} (readable by you only)", err=True)


@click.command("fetch", context_settings=_CONTEXT)
@click.argument("name", required=False, type=click.Choice(SOURCE_NAMES, case_sensitive=False))
@click.option("--list", "list_only", is_flag=True, help="List the fetchable connectomes and their status.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the connectome. Default: <data dir>/connectomes/NAME (data dir: LACUNA_DATA_DIR).",
)
@click.option(
    "--api-key",
    metavar="KEY",
    help="API token (gsp1000: Harvard Dataverse; dtor985: Figshare). Default: DATAVERSE_API_KEY / "
    "FIGSHARE_API_KEY, else the key saved with --save-key.",
)
@click.option("--save-key", is_flag=True, help="Store --api-key in <data dir>/credentials.json (mode 0600) for later runs.")
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    help="gsp1000: number of HDF5 batch files (default 10). More batches, less RAM: 4 GB -> 100, "
    "8 GB -> 50, 16 GB -> 25, 32 GB+ -> 10.",
)
@click.option("--test-mode", is_flag=True, help="gsp1000: fetch the first tarball only, to test the whole pipeline.")
@click.option("--skip-checksum", is_flag=True, help="gsp1000: do not verify MD5 checksums (outdated Dataverse metadata).")
@click.option("--force", is_flag=True, help="Download, convert and register again, replacing files and registrations.")
@click.option("--no-register", is_flag=True, help="Do not register the connectome.")
@click.option("--register-name", metavar="NAME", help="Register under NAME (letters and digits). Default: GSP1000, dTOR985, HCP1065.")
@click.option("--no-keep-original", is_flag=True, help="dtor985, hcp1065: delete the downloaded originals after conversion.")
@click.option("-v", "--verbose", count=True, help="Log output (-vv: debug).")
def fetch(name, list_only, output_dir, api_key, save_key, batches, test_mode, skip_checksum, force, no_register,
          register_name, no_keep_original, verbose):
    """Download, convert and register a normative connectome: gsp1000, dtor985 or hcp1065.

    \b
    Examples:
      lacuna fetch --list
      lacuna fetch gsp1000 --api-key KEY --save-key --batches 50
      lacuna fetch gsp1000 --test-mode          # one tarball: test the pipeline
      lacuna fetch dtor985 --api-key FIGSHARE_TOKEN
      lacuna fetch hcp1065

    An interrupted fetch resumes when the same command is run again. Servers can be
    replaced by mirrors: LACUNA_DATAVERSE_URL, LACUNA_FIGSHARE_API_URL, LACUNA_HCP1065_URL.
    """
    from lacuna.resources.fetching.dispatch import fetch_from_config
    from lacuna.resources.fetching.sources import default_output_dir, get_source

    if list_only:
        if name:
            raise click.UsageError("--list takes no NAME")
        _print_sources()
        return
    if not name:
        raise click.UsageError(f"give a connectome to fetch ({', '.join(SOURCE_NAMES)}), or --list")
    source = get_source(name)
    options = dict(batches=batches, test_mode=test_mode, skip_checksum=skip_checksum, api_key=api_key,
                   save_key=save_key, no_keep_original=no_keep_original)
    _check_options(source, options)
    setup_logging(max(verbose - 1, 0), 0 if verbose else 1)
    try:
        config = FetchConfig.from_cli_args(
            dict(connectome=source.name, output_dir=output_dir or default_output_dir(source.name), api_key=api_key,
                 batches=batches or source.default_batches, force=force, no_keep_original=no_keep_original,
                 no_register=no_register, register_name=register_name)
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    extra = {"test_mode": test_mode, "skip_checksum": skip_checksum} if source.type == "functional" else {}
    printer = ProgressPrinter()
    try:
        result = fetch_from_config(config, progress_callback=printer, **extra)
    except KeyboardInterrupt:
        printer.close()
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except AuthenticationError as exc:
        printer.close()
        raise click.ClickException(str(exc)) from exc
    except (LacunaError, ValueError, FileNotFoundError) as exc:
        printer.close()
        if save_key:
            _save_key(source, api_key)
        failed = FetchResult(success=False, connectome_name=source.name, output_dir=config.output_dir, error=str(exc))
        raise click.ClickException(failed.summary() + "\nRun the same command again to resume.") from exc
    printer.close()
    if save_key:
        _save_key(source, api_key)
    click.echo(result.summary())


@click.command("status", context_settings=_CONTEXT)
@click.argument("name", required=False)
def connectomes_status(name):
    """Show whether the fetchable connectomes (or NAME) are downloaded, processed and
    registered, where, and how much disk they use."""
    from lacuna.resources.fetching.sources import get_source
    from lacuna.resources.fetching.status import get_fetch_status

    try:
        sources = [get_source(name)] if name else [get_source(n) for n in SOURCE_NAMES]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for source in sources:
        status = get_fetch_status(source.name)
        yes = {True: "yes", False: "no"}
        click.echo(f"{source.name} ({source.display_name})")
        click.echo(
            f"  downloaded: {yes[status['downloaded']]}  processed: {yes[status['processed']]}  "
            f"registered: {yes[status['registered']]}"
        )
        if status["location"] is not None:
            click.echo(f"  location: {status['location']} ({format_bytes(status['size_bytes'])})")
        else:
            click.echo(f"  location: none (fetch it with `lacuna fetch {source.name}`)")
