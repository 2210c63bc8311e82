"""Safe extraction of downloaded tar and zip archives.

Every member is checked before it is written: its name must be relative, without
``..`` and without backslashes, and its destination, resolved through whatever was
already extracted (``os.path.realpath``), must lie inside the target folder. Symbolic
and hard links must point inside the target too; device files and FIFOs are refused.
Tar members are then extracted with ``tarfile``'s ``"data"`` filter where Python has it
(3.12, and 3.8-3.11 security releases), as a second line of defence. A refused member
raises :class:`UnsafeArchiveError` and stops the extraction; what was extracted before
it stays inside the target folder.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from lacuna.core.errors import ProcessingError
from lacuna.net.disk import check_disk_space

log = logging.getLogger(__name__)

_DRIVE = re.compile(r"^[A-Za-z]:")
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


class UnsafeArchiveError(ProcessingError):
    """Raised for an archive member that would be written outside the target folder."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refuse(archive: Path, name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive.name}: refusing the archive member {name!r} ({why}); the archive may be "
        f"corrupt or malicious. Delete {archive} and download it again from the official source."
    )


def member_destination(root: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes below ``root`` (resolved), or raise.

    Raises
    ------
    UnsafeArchiveError
        For an absolute name, a ``..`` component, a backslash, or a destination outside
        ``root`` (also through an already extracted symbolic link).
    """
    if not name or "\x00" in name:
        raise _refuse(archive, name, "empty name")
    if name.startswith("/") or _DRIVE.match(name):
        raise _refuse(archive, name, "absolute path")
    if "\\" in name:
        raise _refuse(archive, name, "backslash in the path")
    if ".." in PurePosixPath(name).parts:
        raise _refuse(archive, name, "'..' in the path")
    destination = root / name
    if not _inside(Path(os.path.realpath(destination)), root):
        raise _refuse(archive, name, "it would be written outside the target folder")
    return destination


def _check_link(root: Path, destination: Path, link: str, hard: bool, archive: Path, name: str) -> None:
    """A link member must point inside ``root`` (hard links: relative to the archive
    root; symbolic links: relative to the member's folder)."""
    if not link or link.startswith("/") or _DRIVE.match(link) or "\\" in link:
        raise _refuse(archive, name, f"link to {link!r} outside the target folder")
    base = root if hard else destination.parent
    if not _inside(Path(os.path.realpath(base / link)), root):
        raise _refuse(archive, name, f"link to {link!r} outside the target folder")


def extract_tar(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a tar archive (any compression) safely into ``target``.

    Returns
    -------
    list of Path
        The regular files extracted.

    Raises
    ------
    UnsafeArchiveError
        For a member that would land outside ``target`` (module docs).
    ProcessingError
        If the archive is unreadable.
    InsufficientDiskSpaceError
        If the unpacked members would not fit on the disk.
    """
    archive, root = Path(archive), _prepare(target)
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            check_disk_space(root, sum(m.size for m in members if m.isreg()), f"extracting {archive.name}")
            for member in members:
                destination = member_destination(root, member.name, archive)
                if member.issym() or member.islnk():
                    _check_link(root, destination, member.linkname, member.islnk(), archive, member.name)
                elif not (member.isreg() or member.isdir()):
                    raise _refuse(archive, member.name, "special file (device or FIFO)")
                if _HAS_DATA_FILTER:
                    tar.extract(member, root, filter="data")
                else:  # pragma: no cover - old Python without extraction filters
                    tar.extract(member, root)
                if member.isreg():
                    written.append(destination)
    except UnsafeArchiveError:
        raise
    except Exception as exc:
        if _HAS_DATA_FILTER and isinstance(exc, tarfile.FilterError):
            raise UnsafeArchiveError(f"{archive.name}: refused by the tar safety filter: {exc}") from exc
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            raise ProcessingError(f"cannot extract {archive}: {exc}. Delete it and download it again.") from exc
        raise
    return written


def extract_zip(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a zip archive safely into ``target`` (symbolic-link entries pointing
    inside are skipped, outside refused).

    Returns
    -------
    list of Path
        The regular files extracted.

    Raises
    ------
    UnsafeArchiveError
        For a member that would land outside ``target``.
    ProcessingError
        If the archive is unreadable.
    InsufficientDiskSpaceError
        If the unpacked members would not fit on the disk.
    """
    archive, root = Path(archive), _prepare(target)
    written = []
    try:
        with zipfile.ZipFile(archive) as handle:
            infos = handle.infolist()
            check_disk_space(root, sum(i.file_size for i in infos), f"extracting {archive.name}")
            for info in infos:
                destination = member_destination(root, info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    link = handle.read(info).decode("utf-8", "replace")
                    _check_link(root, destination, link, False, archive, info.filename)
                    log.warning("%s: skipping the symbolic link %s", archive.name, info.filename)
                    continue
                handle.extract(info, root)
                if not info.is_dir():
                    written.append(destination)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ProcessingError(f"cannot extract {archive}: {exc}. Delete it and download it again.") from exc
    return written


def extract_archive(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a zip or tar archive (detected from its content) safely into ``target``.

    Raises
    ------
    UnsafeArchiveError
        For a member that would land outside ``target``.
    ProcessingError
        If the file is not a readable archive.
    """
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        return extract_zip(archive, target)
    if tarfile.is_tarfile(archive):
        return extract_tar(archive, target)
    raise ProcessingError(f"{archive} is neither a tar nor a zip archive. Delete it and download it again.")


def _prepare(target: str | Path) -> Path:
    root = Path(target)
    root.mkdir(parents=True, exist_ok=True)
    return Path(os.path.realpath(root))
