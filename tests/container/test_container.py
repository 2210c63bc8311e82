"""The container recipes: Dockerfile built and run with podman, Singularity.def checked.

The tests marked ``container`` build the image and run the demo dataset in it; the normal
test command deselects them (pyproject ``addopts``). Run them with::

    source ../shared/tools/container-env.sh          # podman + the base image, offline
    python -m pytest -m container tests/container -v -s

They build the image from this checkout with the parcellations served from
``../shared/data/atlases`` by a server on 127.0.0.1 (``--network=host`` for the build),
then run the participant and group levels of the demo dataset in the image — read-only
(``--read-only`` with only a tmpfs ``/tmp``), as an arbitrary ``--user``, without a
HOME, without network, with the inputs mounted read-only and a connectome cache mounted
at ``/cache`` whose connectome was registered on the host under another absolute path —
and compare every table with a native run (byte-identical TSVs). Set
``LACUNA_TEST_IMAGE=name`` to reuse an image built earlier by these tests.

The tests without the mark (recipe consistency, ``spython`` parsing of Singularity.def)
run with the normal test command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_itk_transform
from fake_servers import FolderServer

from lacuna._version import __version__

REPO = Path(__file__).resolve().parents[2]
SHARED_ATLASES = REPO.parent / "shared" / "data" / "atlases"
SPACE = "MNI152NLin6Asym"
IMAGE_TAG = f"ghcr.io/lacuna-neuro/lacuna:{__version__}"
ATLASES = ("SyntheticDemo_16Parcels", "Schaefer2018_100Parcels7Networks", "TianSubcortex_3TS1")
CROSS_SPACE_ATLAS = "HCP1065_thr0p1"  # MNI152NLin2009aAsym: needs the baked transforms
USER = "12345:12345"
HAS_TRANSFORMS = importlib.util.find_spec("lacuna.resources.templates") is not None
SUMMARY: dict[str, str] = {}


# --------------------------------------------------------------------------------------
# Recipe checks (normal test run)
# --------------------------------------------------------------------------------------


def test_recipes_carry_the_package_version():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG VERSION={re.escape(__version__)}$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["lacuna"\]$', dockerfile, re.M)
    assert re.search(r"^FROM debian:bookworm-slim$", dockerfile, re.M)
    definition = (REPO / "Singularity.def").read_text()
    assert f"org.opencontainers.image.version {__version__}" in definition
    assert f"lacuna_{__version__}.sif" in definition
    assert f'VERSION = "{__version__}"' in (REPO / "main").read_text()


def test_dockerignore_sends_only_the_package():
    """Only pyproject.toml, README.md and lacuna/ go into the build context."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!lacuna/"} <= set(rules)


def _singularity_recipe():
    parsers = pytest.importorskip("spython.main.parse.parsers", reason="spython is not installed: pip install spython")
    recipes = parsers.SingularityParser(str(REPO / "Singularity.def")).recipe
    assert len(recipes) == 1  # one stage
    return next(iter(recipes.values()))


def test_singularity_def_parses():
    recipe = _singularity_recipe()
    assert recipe.fromHeader == "debian:bookworm-slim"
    assert recipe.files == [
        "pyproject.toml /opt/lacuna/src/pyproject.toml",
        "README.md /opt/lacuna/src/README.md",
        "lacuna /opt/lacuna/src/lacuna",
    ]
    environment = dict(line.split("=", 1) for line in recipe.environ)
    assert environment["LACUNA_CONTAINER_TYPE"] == "singularity"
    assert environment["LACUNA_DATA_DIR"] == "${LACUNA_DATA_DIR:-/opt/lacuna/data}"
    assert environment["LACUNA_DATA_PATH"] == "/opt/lacuna/data"
    assert environment["PATH"].startswith("/opt/venv/bin:")
    assert recipe.cmd == 'exec /opt/venv/bin/lacuna "$@"'  # %runscript
    install = "\n".join(recipe.install)  # %post
    assert "pip install --no-cache-dir" in install and "lacuna atlases fetch" in install
    assert "apt-get install -y --no-install-recommends python3 python3-venv" in install
    assert "rm -rf /var/lib/apt/lists/*" in install
    tests = (REPO / "Singularity.def").read_text().split("%test", 1)[1]
    assert "lacuna --version" in tests
    labels = dict(line.split(" ", 1) for line in recipe.labels)
    assert labels["org.opencontainers.image.licenses"] == "MIT"


# --------------------------------------------------------------------------------------
# podman: build and run
# --------------------------------------------------------------------------------------


def _podman(*args, check=True, timeout=1200, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def podman():
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (source ../shared/tools/container-env.sh)")
    os.environ.setdefault("CONTAINERS_CONF", "/etc/containers/containers.conf")
    return "podman"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local mirror on 127.0.0.1: atlases (flat) and the MNI transforms (tpl-<B>/)."""
    if not SHARED_ATLASES.is_dir():
        pytest.skip("../shared/data/atlases not available")
    root = tmp_path_factory.mktemp("mirror")
    for source in SHARED_ATLASES.iterdir():
        (root / source.name).symlink_to(source)
    if HAS_TRANSFORMS:
        # Identity stand-ins for TemplateFlow's transforms (the real ones are not here).
        from lacuna.resources.templates import transform_file_name

        for source, target in ((SPACE, "MNI152NLin2009cAsym"), ("MNI152NLin2009cAsym", SPACE)):
            write_itk_transform(root / f"tpl-{target}" / transform_file_name(source, target), np.eye(4))

    with FolderServer(root) as server:
        yield server.url


@pytest.fixture(scope="module")
def image(podman, mirror):
    reuse = os.environ.get("LACUNA_TEST_IMAGE")
    if reuse and _podman("image", "exists", reuse, check=False).returncode == 0:
        return reuse
    name = reuse or "localhost/lacuna:test"
    build_args = [
        "--build-arg", f"LACUNA_ATLAS_URL={mirror}",
        "--build-arg", f"LACUNA_TEMPLATEFLOW_URL={mirror}",
        "--build-arg", f"LACUNA_TRANSFORMS={'all' if HAS_TRANSFORMS else 'none'}",
    ]
    start = time.monotonic()
    _podman("build", "--network=host", *build_args, "-t", name, REPO)
    SUMMARY["build"] = f"{time.monotonic() - start:.0f} s"
    return name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Demo dataset and atlas, and a host connectome cache (world-readable)."""
    from lacuna.workflows.demo import write_demo_atlas, write_demo_dataset
    from lacuna.core.spaces import standard_grid
    from lacuna.formats.functional_connectome import ConnectomeWriter

    root = tmp_path_factory.mktemp("container_inputs")
    write_demo_dataset(root / "bids")
    write_demo_atlas(root / "atlases")
    # A small functional connectome whose brain mask covers the demo lesions (sparse box).
    grid = standard_grid(SPACE, 2)
    ijk = np.indices(grid.shape).reshape(3, -1)
    xyz = (grid.affine[:3, :3] @ ijk).T + grid.affine[:3, 3]
    inside = np.all((xyz >= (-62, -82, -27)) & (xyz <= (42, 47, 47)), axis=1) & (ijk.sum(axis=0) % 5 == 0)
    indices = ijk[:, inside]
    rng = np.random.default_rng(7)
    n_subjects, n_timepoints = 4, 20
    cache = root / "host-cache"
    loadings = rng.uniform(0, 0.5, size=(3, indices.shape[1]))
    with ConnectomeWriter(cache / "connectomes" / "Tiny.h5", n_subjects, n_timepoints, indices, grid.affine, grid.shape, SPACE, 2.0) as writer:
        for _ in range(n_subjects):
            noise = rng.standard_normal((n_timepoints, indices.shape[1]))
            writer.write((noise + rng.standard_normal((n_timepoints, 3)) @ loadings + 500).astype(np.float32))
    registered = _native("connectomes", "register", "Tiny", cache / "connectomes" / "Tiny.h5", "--space", SPACE, "--resolution", "2", data_dir=cache)
    assert registered.returncode == 0, registered.stderr
    # Registered under the host's absolute path, stored relative to the cache.
    entry = json.loads((cache / "connectomes.json").read_text())["connectomes"]["Tiny"]
    assert entry["path"] == "connectomes/Tiny.h5"
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _native(*args, data_dir: Path, mirror: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LACUNA_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    for name in ("LACUNA_ATLAS_URL", "LACUNA_TEMPLATEFLOW_URL", "LACUNA_DATA_PATH", "LACUNA_CONTAINER_TYPE", "LACUNA_CONTAINER_TAG"):
        env.pop(name, None)
    if mirror:
        env["LACUNA_ATLAS_URL"] = env["LACUNA_TEMPLATEFLOW_URL"] = mirror
    command = [sys.executable, "-m", "lacuna.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)


def _run_args(bids: str, out: str, work: str, atlas_dir: str) -> list[str]:
    atlases = [*ATLASES, CROSS_SPACE_ATLAS] if HAS_TRANSFORMS else list(ATLASES)
    return [
        bids, out, "participant", "--atlas-dir", atlas_dir, "--atlas", *atlases,
        "--functional-connectome", "Tiny", "-w", work, "--nprocs", "2", "--mem", "1",
    ]


def _in_container(image: str, inputs: Path, out: Path, work: Path, *args: str, network: str = "none") -> subprocess.CompletedProcess:
    """``podman run`` as the README documents it, with the strictest settings.

    The host's ``OPENBLAS_*`` settings (e.g. ``OPENBLAS_CORETYPE``) are passed on so that
    both runs use the same BLAS kernels: float32 results differ in the last bits otherwise.
    """
    blas = [f"--env={name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("OPENBLAS_")]
    return _podman(
        "run", "--rm", *blas,
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",  # only /tmp writable
        "--user", USER, "-e", "HOME=/nonexistent", f"--network={network}",
        "-v", f"{inputs / 'bids'}:/data/bids:ro",
        "-v", f"{inputs / 'atlases'}:/data/atlases:ro",
        "-v", f"{inputs / 'host-cache'}:/cache:ro", "-e", "LACUNA_DATA_DIR=/cache",
        "-v", f"{out}:/out", "-v", f"{work}:/work",
        image, *args,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(image, inputs, mirror, tmp_path_factory):
    """(native derivatives, container derivatives) of both levels."""
    root = tmp_path_factory.mktemp("container_runs")
    # Native: a copy of the host cache; atlases and transforms come from the mirror.
    native_cache = root / "native-cache"
    shutil.copytree(inputs / "host-cache", native_cache)
    native = root / "native"
    args = _run_args(str(inputs / "bids"), str(native), str(root / "native-work"), str(inputs / "atlases"))
    start = time.monotonic()
    participant = _native(*args, data_dir=native_cache, mirror=mirror)
    assert participant.returncode == 0, participant.stdout + participant.stderr
    group = _native(inputs / "bids", native, "group", data_dir=native_cache)
    assert group.returncode == 0, group.stdout + group.stderr
    SUMMARY["native run"] = f"{time.monotonic() - start:.1f} s"

    contained, work = root / "container", root / "container-work"
    for folder in (contained, work):
        folder.mkdir()
        folder.chmod(0o777)  # written by --user 12345
    start = time.monotonic()
    participant = _in_container(image, inputs, contained, work, *_run_args("/data/bids", "/out", "/work", "/data/atlases"))
    assert participant.returncode == 0, participant.stdout + participant.stderr
    assert "5 done" in participant.stdout, participant.stdout
    group = _in_container(image, inputs, contained, work, "/data/bids", "/out", "group")
    assert group.returncode == 0, group.stdout + group.stderr
    SUMMARY["container run"] = f"{time.monotonic() - start:.1f} s"
    return native, contained


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    if SUMMARY:
        print("\n[container] " + "; ".join(f"{key}: {value}" for key, value in SUMMARY.items()))


@pytest.mark.container
def test_image_metadata(podman, image):
    config = json.loads(_podman("image", "inspect", image).stdout)[0]
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"].startswith("https://github.com/")
    assert config["Config"]["Entrypoint"] == ["lacuna"]
    assert config["Config"]["User"] == "lacuna"
    env = dict(item.split("=", 1) for item in config["Config"]["Env"])
    assert env["LACUNA_CONTAINER_TYPE"] == "docker" and env["LACUNA_CONTAINER_TAG"] == IMAGE_TAG
    assert env["LACUNA_DATA_DIR"] == env["LACUNA_DATA_PATH"] == "/opt/lacuna/data"
    assert "LACUNA_ATLAS_URL" not in env  # the build-time mirror does not leak into runs
    size_mb = config["Size"] / 1e6
    SUMMARY["image size"] = f"{size_mb:.0f} MB"
    assert size_mb < 800
    # No build tools left behind, nothing of apt's lists.
    probe = _podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                    "for t in gcc cc c++ make; do command -v $t && exit 1; done; ls /var/lib/apt/lists | wc -l")
    assert probe.stdout.strip() == "0", probe.stdout


@pytest.mark.container
def test_version_and_offline_atlases(podman, image, tmp_path):
    version = _podman("run", "--rm", "--read-only", "--network=none", "--user", USER, image, "--version")
    assert version.stdout.strip() == f"lacuna, version {__version__}"
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    for extra in ([], ["-v", f"{empty_cache}:/cache:ro", "-e", "LACUNA_DATA_DIR=/cache"]):
        listed = _podman("run", "--rm", "--read-only", "--network=none", "--user", USER, *extra, image, "atlases", "list")
        lines = [line for line in listed.stdout.splitlines() if " catalogue " in line]
        assert len(lines) >= 15 and all(line.endswith(" cached") for line in lines), listed.stdout


@pytest.mark.container
def test_container_outputs_match_native(runs):
    native, contained = runs
    native_files = sorted(p.relative_to(native).as_posix() for p in native.rglob("*") if p.is_file())
    contained_files = sorted(p.relative_to(contained).as_posix() for p in contained.rglob("*") if p.is_file())
    assert contained_files == native_files
    tables = [name for name in native_files if name.endswith(".tsv")]
    images = [name for name in native_files if name.endswith(".nii.gz")]
    assert len(tables) > 20 and any(name.startswith("group/") for name in tables)
    assert any("flnmTiny" in name for name in tables)  # the connectome from the mounted cache
    assert any("Schaefer2018" in name for name in tables)  # an atlas baked into the image
    if HAS_TRANSFORMS:
        assert any("HCP1065" in name for name in tables)  # across spaces: baked transforms
    different = [name for name in tables if (native / name).read_bytes() != (contained / name).read_bytes()]
    assert not different, f"TSVs differ between native and container runs: {different}"
    for name in images:
        a, b = nib.load(native / name), nib.load(contained / name)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), err_msg=name)
        np.testing.assert_array_equal(a.affine, b.affine, err_msg=name)
    SUMMARY["compared"] = f"{len(tables)} TSVs byte-identical, {len(images)} NIfTIs equal"
    description = json.loads((contained / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": IMAGE_TAG}
    assert "Container" not in json.loads((native / "dataset_description.json").read_text())["GeneratedBy"][0]


@pytest.mark.container
def test_outputs_validate_in_the_container(podman, image, runs):
    _, contained = runs
    result = _podman("run", "--rm", "--read-only", "--network=none", "--user", USER,
                     "-v", f"{contained}:/out:ro", image, "validate", "/out")
    assert result.stdout.strip().endswith("0 error(s), 0 warning(s)"), result.stdout


@pytest.mark.container
def test_singularity_def_steps_build_with_podman(podman, mirror, tmp_path):
    """Singularity.def converted by spython to a Dockerfile, built, and its %test run."""
    recipe = _singularity_recipe()
    from spython.main.parse.writers import DockerWriter

    dockerfile = DockerWriter({"spython-base": recipe}).convert()
    lines = [line for line in dockerfile.splitlines() if not line.startswith("HEALTHCHECK")]
    # Build-time mirrors reach %post as environment variables, as from `apptainer build`.
    lines.insert(1, "ARG LACUNA_ATLAS_URL\nARG LACUNA_TEMPLATEFLOW_URL")
    if not HAS_TRANSFORMS:
        lines = [line for line in lines if "transform_path" not in line]
    (tmp_path / "Dockerfile").write_text("\n".join(lines) + "\n")
    name = "localhost/lacuna-singularity-steps:test"
    start = time.monotonic()
    _podman("build", "--network=host", "-f", tmp_path / "Dockerfile",
            "--build-arg", f"LACUNA_ATLAS_URL={mirror}", "--build-arg", f"LACUNA_TEMPLATEFLOW_URL={mirror}", "-t", name, REPO)
    SUMMARY["Singularity.def steps build"] = f"{time.monotonic() - start:.0f} s"
    try:
        tested = _podman("run", "--rm", "--read-only", "--network=none", "--user", USER, "--entrypoint", "/bin/sh", name, "/tests.sh")
        assert f"lacuna, version {__version__}" in tested.stdout
        assert tested.stdout.count(" cached") >= 15, tested.stdout
        env = _podman("run", "--rm", "--entrypoint", "/bin/sh", name, "-c", "echo $LACUNA_CONTAINER_TYPE $LACUNA_DATA_DIR")
        assert env.stdout.split() == ["singularity", "/opt/lacuna/data"]
    finally:
        _podman("rmi", "-f", name, check=False)
