"""The seed documentation's examples run as written (issue 15).

Every example of the seed API reference (``../shared/spec/000_da3fad364225a712.txt``,
lines starting ``>>>`` with their ``...`` continuation lines) is extracted and run, in
document order, in one namespace, as doctest would run it: each ``>>>`` statement is
compiled in ``single`` mode (an expression's value is echoed), and the seed's
continuation lines, which carry no indentation after ``...``, are indented under the
compound statement (``for ...:``, ``if ...:``) they belong to.

What the examples take for granted is provided before they run:

* the names the document describes, as if imported: the public names of ``lacuna.io``,
  the analyses of ``lacuna.analysis`` and ``SubjectData``;
* ``subject_data`` / ``mask_data`` / ``result`` / ``results``, where a block uses one that
  no earlier block defined: a SubjectData (``sub-01``) with RegionalDamage results; the
  ``export_results_to_tsv`` example exports ``analysis_name="ParcelAggregation"``, so the
  ``result`` it is given also carries ParcelAggregation results;
* the files its paths name, tiny: ``bids_dir`` and ``lesion.nii.gz`` (exactly on the
  MNI152NLin6Asym 1 mm template grid, no space declared anywhere) in the current
  directory (a temporary folder), and ``/data/...`` (METAVCI_PSCI_BIDS, dTOR985.trk,
  hcp1065_tracts, a raw GSP1000 layout with its brain mask, my_connectome.h5);
* local fake servers (tests/fake_servers.py, as tests/test_fetch.py drives them) for the
  fetch examples, through the ``LACUNA_*`` URL variables; atlases from ../shared served
  through ``LACUNA_ATLAS_URL``.

Absolute paths are not created on the real file system: in the example source, string
literals starting ``/data`` or ``/mnt/nvme`` are rewritten to the same path under the
test's temporary folder (a textual prefix substitution; nothing else in the code is
changed). That is what "runs as written once its file paths exist" allows.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import save_mask, sphere, write_bids_dataset
from fake_servers import (
    FakeServer,
    serve_dataverse,
    serve_figshare,
    serve_github_release,
)
from test_fetch import (  # noqa: F401
    ARTICLE,
    PID,
    _dataverse_files,
    _trk_bytes,
    gsp_payload,
    trk_payload,
)

from lacuna.core.spaces import Grid, standard_grid

SEED = Path(__file__).resolve().parents[2] / "shared" / "spec" / "000_da3fad364225a712.txt"

PROMPT = re.compile(r"^>>>(?: |$)")
CONTINUATION = re.compile(r"^\.\.\.(?: |$)")
HEADING = re.compile(r"^([A-Za-z_]\w*)(?:\(.*\))?$")
COMPOUND = re.compile(r"^\s*(?:for|while|if|elif|else|with|try|except|finally|def|class|async)\b.*:\s*(?:#.*)?$")
ABSOLUTE = re.compile(r"""(["'])(/data|/mnt/nvme)(?=[/"'])""")

#: Variables the examples use without defining them (a subject with results).
GIVEN = ("subject_data", "mask_data", "result", "results")

GRID_1MM = standard_grid("MNI152NLin6Asym", 1)
GRID_2MM = standard_grid("MNI152NLin6Asym", 2)
DATAVERSE_KEYS = {"key", "your-dataverse-api-key"}  # the two keys the examples pass
FIGSHARE_TOKEN = "YOUR_TOKEN"


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


@dataclass
class Statement:
    line: int  # 1-based line of its ``>>>``
    source: str


@dataclass
class Block:
    line: int
    api: str  # the documented name the block belongs to
    statements: list[Statement] = field(default_factory=list)

    @property
    def source(self) -> str:
        return "".join(s.source for s in self.statements)

    @property
    def label(self) -> str:
        return f"{self.api} (seed line {self.line})"


def parse_examples(text: str) -> list[Block]:
    """Example blocks: runs of consecutive ``>>>``/``...`` lines; anything else (printed
    output, prose) ends a block. Each ``>>>`` line starts a statement."""
    lines = text.splitlines()
    blocks: list[Block] = []
    api = "module"
    current: Block | None = None
    depth = 0
    for number, line in enumerate(lines, start=1):
        following = lines[number] if number < len(lines) else ""
        heading = HEADING.match(line.strip())
        if heading and following.strip() == "¶":
            api = heading.group(1)
        if PROMPT.match(line):
            code = line[4:]
            if current is None:
                current = Block(number, api)
                blocks.append(current)
            current.statements.append(Statement(number, code + "\n"))
            depth = 1 if COMPOUND.match(code) else 0
        elif CONTINUATION.match(line) and current is not None and current.statements:
            code = line[4:]
            # The seed drops indentation after "... ": indent a compound statement's body.
            if depth and code.strip() and not code[:1].isspace():
                code = "    " * depth + code
            current.statements[-1].source += code + "\n"
            if COMPOUND.match(code):
                depth += 1
        else:
            current = None
            depth = 0
    return blocks


def is_code(source: str) -> bool:
    return any(s.strip() and not s.strip().startswith("#") for s in source.splitlines())


def rewrite_paths(source: str, root: Path) -> str:
    """``"/data/x"`` -> ``"<root>/data/x"`` (and ``/mnt/nvme``) inside string literals."""
    return ABSOLUTE.sub(lambda m: m.group(1) + str(root) + m.group(2), source)


BLOCKS = parse_examples(SEED.read_text()) if SEED.is_file() else []


# --------------------------------------------------------------------------------------
# The parser itself
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not SEED.is_file(), reason="seed documentation not available")
def test_every_prompt_line_is_extracted_once_and_compiles():
    prompts = [n for n, line in enumerate(SEED.read_text().splitlines(), 1) if PROMPT.match(line)]
    assert [s.line for b in BLOCKS for s in b.statements] == prompts
    assert len(BLOCKS) == 24
    apis = [b.api for b in BLOCKS]
    assert apis[:3] == ["batch_export_to_csv", "batch_export_to_tsv", "export_bids_derivatives"]
    assert apis.count("validate_bids_derivatives") == 2  # split by its printed output
    assert apis.count("load_bids_dataset") == 4
    for block in BLOCKS:
        for statement in block.statements:
            if is_code(statement.source):
                compile(statement.source, block.label, "single")
    # Printed outputs are not code.
    assert not any("PosixPath(" in b.source or "{'errors': []" in b.source for b in BLOCKS)
    loop = next(b for b in BLOCKS if b.api == "list_fetchable_connectomes")
    assert loop.statements[-1].source == (
        "for source in list_fetchable_connectomes():\n"
        '    print(f"{source.name}: {source.display_name}")\n'
    )
    call = next(b for b in BLOCKS if b.api == "trk_to_tck")
    assert 'trk_path="/data/dTOR985.trk",\n' in call.source  # call arguments stay as written


def test_path_rewriting_is_a_prefix_substitution(tmp_path):
    source = "f('/data/a.trk', \"/data\", '/mnt/nvme/x', 'data/y', '/database', d)\n"
    assert rewrite_paths(source, tmp_path) == (
        f"f('{tmp_path}/data/a.trk', \"{tmp_path}/data\", '{tmp_path}/mnt/nvme/x', 'data/y', '/database', d)\n"
    )


def test_trk_to_tck_records_the_space_only_of_a_template_header_grid(tmp_path):
    from nibabel.streamlines import Field, Tractogram, TrkFile

    from lacuna.io import trk_to_tck

    streamlines = [np.array([[0, 0, 0], [1, 2, 3]], np.float32)]
    cropped = Grid((90, 109, 91), GRID_2MM.affine)  # the FSL lattice, but no template grid
    for name, grid, expected in (
        ("fsl", GRID_2MM, {"SpatialReference": "MNI152NLin6Asym"}),
        ("cropped", cropped, None),
    ):
        header = {Field.VOXEL_TO_RASMM: grid.affine, Field.VOXEL_SIZES: tuple(abs(np.diag(grid.affine)[:3])),
                  Field.DIMENSIONS: grid.shape, Field.VOXEL_ORDER: "LAS"}
        TrkFile(Tractogram(streamlines, affine_to_rasmm=np.eye(4)), header=header).save(str(tmp_path / f"{name}.trk"))
        out = trk_to_tck(tmp_path / f"{name}.trk", tmp_path / f"{name}.tck")
        np.testing.assert_allclose(nib.streamlines.load(str(out)).streamlines[0], streamlines[0], atol=1e-5)
        sidecar = tmp_path / f"{name}.json"
        assert (json.loads(sidecar.read_text()) if sidecar.exists() else None) == expected


# --------------------------------------------------------------------------------------
# What the examples take for granted
# --------------------------------------------------------------------------------------


def _write_trk(path: Path, n_streamlines: int, seed: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_trk_bytes(path.parent, path.name, n_streamlines, seed))
    return n_streamlines


def _write_gsp_raw(root: Path) -> tuple[Path, Path]:
    """Two subjects in the raw GSP1000 layout convert.gsp1000_to_hdf5 reads, and the
    FSL 2 mm brain mask (a small box)."""
    rng = np.random.default_rng(7)
    box = (slice(40, 44), slice(50, 54), slice(38, 41))
    brain = np.zeros(GRID_2MM.shape, np.uint8)
    brain[box] = 1
    mask_path = save_mask(root / "templates" / "MNI152_T1_2mm_Brain_Mask.nii.gz", brain, GRID_2MM.affine)
    gsp_dir = root / "GSP1000"
    for subject in ("sub-0001", "sub-0002"):
        data = np.zeros((*GRID_2MM.shape, 6), np.int16)
        data[box] = (1000 + rng.normal(0, 30, (*data[box].shape,))).astype(np.int16)
        path = gsp_dir / subject / "func" / f"{subject}_bld001_rest_skip4_stc_mc_bp_sm6_finalmask.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, GRID_2MM.affine), path)
    return gsp_dir, mask_path


@dataclass
class World:
    root: Path  # stands for "/"
    cwd: Path
    given: object  # the SubjectData given to blocks that use one they did not define
    server: FakeServer
    hcp_streamlines: int
    real_paths: dict[str, bool]


@pytest.fixture
def world(tmp_path, monkeypatch, static_server, shared_atlases, gsp_payload, trk_payload):  # noqa: F811
    from lacuna import SubjectData
    from lacuna.analysis import RegionalDamage
    from lacuna.io import gsp1000_to_hdf5
    from lacuna.net import http as base

    root, cwd = tmp_path / "root", tmp_path / "cwd"
    data = root / "data"
    cwd.mkdir(parents=True)
    real_paths = {p: Path(p).exists() for p in ("/data/dTOR985.tck", "/data/hcp1065.tck", "/mnt/nvme/lacuna_data")}

    monkeypatch.setenv("LACUNA_ATLAS_URL", static_server(shared_atlases))
    monkeypatch.setattr(base, "RETRY_BACKOFF_SECONDS", 0.0)
    for variable in ("DATAVERSE_API_KEY", "FIGSHARE_API_KEY"):
        monkeypatch.delenv(variable, raising=False)

    # Current directory: a BIDS dataset of masks and a mask on the 1 mm template grid.
    write_bids_dataset(cwd / "bids_dir", {
        f"sub-{n}/anat/sub-{n}_space-MNI152NLin6Asym_label-lesion_mask.nii.gz":
            (sphere(GRID_2MM, centre, 8), GRID_2MM.affine)
        for n, centre in (("01", (-40, -20, 40)), ("02", (30, 10, 30)))
    })
    lesion = sphere(GRID_1MM, (-40, -20, 40), 8)
    nib.save(nib.Nifti1Image(lesion, GRID_1MM.affine), cwd / "lesion.nii.gz")  # no space anywhere
    (cwd / "output").mkdir()  # save_nifti(mask_data, 'output/lesion.nii.gz')

    # /data: a BIDS dataset as in the load_bids_dataset examples.
    metavci = data / "METAVCI_PSCI_BIDS"
    cas001 = "sub-CAS001/ses-01/anat/sub-CAS001_ses-01_space-MNI152NLin6Asym_res-2"
    write_bids_dataset(metavci, {
        f"{cas001}_label-acuteinfarct_mask.nii.gz": (sphere(GRID_2MM, (-30, -10, 20), 8), GRID_2MM.affine),
        f"{cas001}_label-WMH_mask.nii.gz": (sphere(GRID_2MM, (20, 0, 25), 6), GRID_2MM.affine),
        # No space in the name: the last example passes space= and resolution=.
        "sub-CAS005/ses-01/anat/sub-CAS005_ses-01_label-acuteinfarct_mask.nii.gz":
            (sphere(GRID_2MM, (30, -20, 10), 8), GRID_2MM.affine),
    })
    # Tractograms: one dTOR985-like .trk, a folder of HCP1065-like tracts (one cranial nerve).
    _write_trk(data / "dTOR985.trk", 20, 4)
    hcp = _write_trk(data / "hcp1065_tracts" / "association" / "AF_L.trk", 5, 1)
    hcp += _write_trk(data / "hcp1065_tracts" / "projection" / "CST_R.trk", 7, 2)
    _write_trk(data / "hcp1065_tracts" / "cranial_nerve" / "CNII_L.trk", 3, 3)
    # Raw GSP1000 with its brain mask, and a connectome file converted from it.
    gsp_dir, mask_path = _write_gsp_raw(data)
    chunks = gsp1000_to_hdf5(gsp_dir, mask_path, tmp_path / "prepared", subjects_per_chunk=10)
    shutil.copy(chunks[0], data / "my_connectome.h5")

    # The subject given to blocks that use one they did not define.
    given_path = save_mask(
        tmp_path / "given" / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz",
        sphere(GRID_2MM, (-40, -20, 40), 8), GRID_2MM.affine,
    )
    given = RegionalDamage().run(SubjectData.from_nifti(given_path))

    monkeypatch.chdir(cwd)
    with FakeServer() as server:
        # Dataverse (GSP1000): the examples pass two different keys; accept any, check below.
        serve_dataverse(server, "key", PID, _dataverse_files(gsp_payload))
        for route in server.routes.values():
            route.auth = None
        serve_figshare(server, FIGSHARE_TOKEN, ARTICLE, [
            {"id": 6, "name": "dTOR_985_tractogram.trk", "content": trk_payload["dtor"]},
        ])
        monkeypatch.setenv("LACUNA_DATAVERSE_URL", server.url())
        monkeypatch.setenv("LACUNA_FIGSHARE_API_URL", server.url("/v2"))
        monkeypatch.setenv("LACUNA_HCP1065_URL", serve_github_release(server, trk_payload["hcp_zip"]))
        yield World(root, cwd, given, server, hcp, real_paths)


# --------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    block: Block
    output: str = ""
    error: str | None = None
    after: list[dict] = field(default_factory=list)  # namespace after each statement


def _namespace() -> dict:
    import lacuna.analysis
    import lacuna.io
    from lacuna import SubjectData

    namespace = {"__name__": "__seed_examples__", "SubjectData": SubjectData}
    for module in (lacuna.io, lacuna.analysis):
        namespace.update({name: getattr(module, name) for name in module.__all__})
    return namespace


def _provide(block: Block, namespace: dict, world: World) -> None:
    """Give the block the variables it uses but no earlier block defined."""
    from lacuna.analysis import ParcelAggregation

    used = set()
    for statement in block.statements:
        if is_code(statement.source):
            used |= set(compile(statement.source, block.label, "single").co_names)
    for name in GIVEN:
        if name in used and name not in namespace:
            namespace[name] = [world.given] if name == "results" else world.given
    if block.api == "export_results_to_tsv":
        namespace["result"] = ParcelAggregation(source="mask").run(namespace["result"])


def run_examples(world: World) -> list[Run]:
    namespace = _namespace()
    runs = []
    for block in BLOCKS:
        run = Run(block)
        runs.append(run)
        _provide(block, namespace, world)
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                for statement in block.statements:
                    if is_code(statement.source):
                        source = rewrite_paths(statement.source, world.root)
                        exec(compile(source, f"<seed line {statement.line}>", "single"), namespace)  # noqa: S102
                    run.after.append(dict(namespace))
        except Exception:  # noqa: BLE001 - reported per block below
            run.error = traceback.format_exc()
        run.output = buffer.getvalue()
    return runs


def _only(runs: list[Run], api: str) -> Run:
    (found,) = [r for r in runs if r.block.api == api]
    return found


def _table(path: Path, sep: str) -> pd.DataFrame:
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


@pytest.mark.skipif(not SEED.is_file(), reason="seed documentation not available")
def test_seed_examples_run_as_written(world):
    runs = run_examples(world)

    failed = [r for r in runs if r.error]
    assert not failed, "\n\n".join(
        f"example {r.block.label} failed:\n{r.block.source}\n{r.error}" for r in failed
    )
    assert len(runs) == 24
    cwd, data = world.cwd, world.root / "data"

    # Group exports: one row per subject of bids_dir.
    for name, sep in (("group_results.csv", ","), ("group_results.tsv", "\t")):
        table = _table(cwd / name, sep)
        assert sorted(table["subject_id"]) == ["01", "02"]
        assert any(c.startswith("RegionalDamage.percent_damaged_Schaefer2018") for c in table.columns)

    # BIDS derivatives of the given subject, printed path, then a clean validation.
    derivatives = _only(runs, "export_bids_derivatives")
    output_path = derivatives.after[-1]["output_path"]
    assert Path(output_path).resolve() == (cwd / "derivatives/lacuna-v0.1.0/sub-01").resolve()
    assert f"Derivatives saved to: {output_path}" in derivatives.output
    assert any(Path(output_path).rglob("*.tsv"))
    validations = [r for r in runs if r.block.api == "validate_bids_derivatives"]
    assert "{'errors': [], 'warnings': []}" in validations[0].output
    assert validations[1].after[-1]["result"]["errors"] == [] and "Found" not in validations[1].output

    # Provenance JSON, indented and compact.
    assert json.loads((cwd / "provenance.json").read_text())
    compact = (cwd / "prov.json").read_text()
    assert json.loads(compact) and "\n " not in compact

    # from_nifti without a space: the template grid gives the space and resolution.
    csv_run = _only(runs, "export_results_to_csv")
    lesion = csv_run.after[-1]["lesion"]
    assert (lesion.space, lesion.resolution) == ("MNI152NLin6Asym", 1.0)
    for name in ("results.csv", "damage.csv"):
        table = _table(cwd / name, ",")
        assert len(table) == 1 and table.loc[0, "coordinate_space"] == "MNI152NLin6Asym"
    assert float(_table(cwd / "damage.csv", ",").loc[0, "RegionalDamage.lesion_voxels"]) == np.count_nonzero(
        nib.load(cwd / "lesion.nii.gz").get_fdata()
    )
    assert json.loads((cwd / "results.json").read_text())["metadata"]["coordinate_space"] == "MNI152NLin6Asym"
    assert "provenance" in json.loads((cwd / "damage_full.json").read_text())
    assert "\n" not in (cwd / "api_response.json").read_text().strip()
    atlas_only = _table(cwd / "atlas_only.tsv", "\t")
    assert "subject_id" not in atlas_only.columns
    assert atlas_only.columns.str.startswith("ParcelAggregation.").all()

    # Fetches against the fake servers.
    fetched = _only(runs, "fetch_connectome").after[-1]["result"]
    assert fetched.success and fetched.registered and fetched.output_files
    assert all(p.is_file() and p.parent == data / "batches" for p in fetched.output_files)
    dtor = _only(runs, "fetch_dtor985")
    assert dtor.output.strip() == str(data / "connectomes/dtor985/dTOR985.tck")
    assert (data / "connectomes/dtor985/dTOR985.tck").is_file()
    gsp = _only(runs, "fetch_gsp1000")
    assert gsp.after[-1]["result"].success and "GSP1000" in gsp.output
    assert {r.headers.get("X-Dataverse-key") for r in world.server.requests if r.path.startswith("/api/")} == DATAVERSE_KEYS
    hcp = _only(runs, "fetch_hcp1065")
    assert Path(hcp.output.strip()) == data / "connectomes/hcp1065/HCP1065.tck"
    assert Path(hcp.output.strip()).is_file()

    # Connectome paths: the registered name, then a direct path.
    paths = _only(runs, "get_connectome_path").after
    assert paths[0]["path"] == data / "batches"
    assert paths[1]["path"] == (data / "my_connectome.h5").resolve()

    # The data directory as set by the example (rewritten under tmp).
    assert _only(runs, "get_data_dir").output.strip() == str(world.root / "mnt/nvme/lacuna_data")

    assert _only(runs, "gsp1000_to_hdf5").output.strip() == "Created 1 chunk files"
    assert (data / "connectomes/gsp1000_chunks/gsp1000_chunk_000.h5").is_file()
    listed = _only(runs, "list_fetchable_connectomes").output.splitlines()
    assert [line.split(":")[0] for line in listed] == ["gsp1000", "dtor985", "hcp1065"]

    loads = [r for r in runs if r.block.api == "load_bids_dataset"]
    assert loads[0].output.strip() == "Loaded 2 masks"  # CAS005 declares no space: skipped
    assert [len(r.after[-1]["dataset"]) for r in loads[1:]] == [1, 1, 1]
    assert "acuteinfarct" in next(iter(loads[1].after[-1]["dataset"]))
    assert "WMH" in next(iter(loads[2].after[-1]["dataset"]))
    (cas005,) = loads[3].after[-1]["dataset"].values()
    assert cas005.subject_id == "CAS005" and (cas005.space, cas005.resolution) == ("MNI152NLin6Asym", 2.0)

    merged = _only(runs, "merge_trk_to_tck").after[-1]["tck_path"]
    assert Path(merged) == data / "hcp1065.tck"
    assert len(nib.streamlines.load(str(merged)).streamlines) == world.hcp_streamlines  # no cranial nerve

    saved = nib.load(cwd / "output/lesion.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj) > 0, world.given.mask)

    converted = _only(runs, "trk_to_tck").after[-1]
    assert len(nib.streamlines.load(str(converted["tck_path"])).streamlines) == 20
    analysis = converted["analysis"]
    assert type(analysis).__name__ == "StructuralNetworkMapping"
    assert Path(analysis.tractogram) == data / "dTOR985.tck"
    # Its space comes from the .trk header grid (MNI152NLin2009cAsym 1 mm), kept beside the .tck.
    assert json.loads((data / "dTOR985.json").read_text()) == {"SpatialReference": "MNI152NLin2009cAsym"}
    assert analysis.space == "MNI152NLin2009cAsym"

    # Nothing was written outside the temporary folder.
    assert {p: Path(p).exists() for p in world.real_paths} == world.real_paths
