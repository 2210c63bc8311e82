"""The catalogue of standard parcellations Lacuna can download (:data:`CATALOGUE`)."""

from __future__ import annotations

from dataclasses import dataclass

from lacuna.core.entities import strip_extension


@dataclass(frozen=True)
class CatalogueEntry:
    """A standard parcellation Lacuna can download.

    ``image_file`` and ``labels_file`` are the names on a mirror (``$LACUNA_ATLAS_URL``)
    and in the cache; ``image_url`` and ``labels_url`` are the default public sources.
    Labels from ``labels_url`` are cached under ``image_file``'s stem plus the URL's
    extension (``.tsv`` or ``.txt``), so the reader applies the matching format.
    """

    name: str
    space: str
    image_file: str
    labels_file: str
    citation: str
    licence: str
    image_url: str
    labels_url: str

    @property
    def stem(self) -> str:
        """File name of the image without extension."""
        return strip_extension(self.image_file)


SCHAEFER_CITATION = (
    "Schaefer A, Kong R, Gordon EM, et al. Local-global parcellation of the human cerebral "
    "cortex from intrinsic functional connectivity MRI. Cereb Cortex. 2018;28(9):3095-3114."
)
TIAN_CITATION = (
    "Tian Y, Margulies DS, Breakspear M, Zalesky A. Topographic organization of the human "
    "subcortex unveiled with functional connectivity gradients. Nat Neurosci. "
    "2020;23(11):1421-1432."
)
YEH_CITATION = (
    "Yeh FC. Population-based tract-to-region connectome of the human brain and its "
    "hierarchical topology. Nat Commun. 2022;13:4933."
)

# Default public sources. The TemplateFlow addresses follow TemplateFlow's published
# layout (its S3 store). The Tian (yetianmed/subcortex) and HCP1065 (frankyeh/data-atlas)
# addresses are best knowledge and could NOT be verified from the offline machine this
# was written on; the HCP1065 one in particular is a guess at a release asset. Sites
# that need a fixed, verified source (or have no internet) should host the files, named
# as in ``image_file``/``labels_file``, in one folder and set $LACUNA_ATLAS_URL to it.
_TEMPLATEFLOW = "https://templateflow.s3.amazonaws.com"
_TIAN_REPO = "https://github.com/yetianmed/subcortex/raw/master/Group-Parcellation/3T"
_YEH_RELEASES = "https://github.com/frankyeh/data-atlas/releases/download"


def _schaefer_entry(parcels: int, networks: int) -> CatalogueEntry:
    desc = f"{parcels}Parcels{networks}Networks"
    tpl = "tpl-MNI152NLin6Asym"
    stem = f"{tpl}_res-01_atlas-Schaefer2018_desc-{desc}_dseg"
    return CatalogueEntry(
        name=f"Schaefer2018_{desc}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=SCHAEFER_CITATION,
        licence="MIT (CBIG, Yeo lab); distributed by TemplateFlow",
        image_url=f"{_TEMPLATEFLOW}/{tpl}/{stem}.nii.gz",
        labels_url=f"{_TEMPLATEFLOW}/{tpl}/{tpl}_atlas-Schaefer2018_desc-{desc}_dseg.tsv",
    )


def _tian_entry(scale: int) -> CatalogueEntry:
    stem = f"tpl-MNI152NLin6Asym_res-01_atlas-TianSubcortex_desc-3TS{scale}_dseg"
    folder = f"{_TIAN_REPO}/Subcortex-Only"
    return CatalogueEntry(
        name=f"TianSubcortex_3TS{scale}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=TIAN_CITATION,
        licence="see https://github.com/yetianmed/subcortex (not verified)",
        image_url=f"{folder}/Tian_Subcortex_S{scale}_3T_1mm.nii.gz",
        labels_url=f"{folder}/Tian_Subcortex_S{scale}_3T_label.txt",
    )


def _schaefer_tian_entry(scale: int, parcels: int, networks: int) -> CatalogueEntry:
    desc = f"{parcels}Parcels{networks}Networks"
    stem = f"tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018TianS{scale}_desc-{desc}_dseg"
    upstream = f"Schaefer2018_{parcels}Parcels_{networks}Networks_order_Tian_Subcortex_S{scale}"
    return CatalogueEntry(
        name=f"Schaefer2018TianS{scale}_{desc}",
        space="MNI152NLin6Asym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=f"{SCHAEFER_CITATION} {TIAN_CITATION}",
        licence="Schaefer: MIT; Tian: see https://github.com/yetianmed/subcortex (not verified)",
        image_url=(
            f"{_TIAN_REPO}/Cortex-Subcortex/MNIvolumetric/{upstream}_MNI152NLin6Asym_1mm.nii.gz"
        ),
        labels_url=f"{_TIAN_REPO}/Cortex-Subcortex/{upstream}_label.txt",
    )


def _hcp1065_entry() -> CatalogueEntry:
    stem = "tpl-MNI152NLin2009aAsym_res-01_atlas-HCP1065_desc-thr0p1_probseg"
    return CatalogueEntry(
        name="HCP1065_thr0p1",
        space="MNI152NLin2009aAsym",
        image_file=f"{stem}.nii.gz",
        labels_file=f"{stem}.txt",
        citation=YEH_CITATION,
        licence="CC BY-SA 4.0; derived from WU-Minn HCP data (acknowledge the HCP)",
        image_url=f"{_YEH_RELEASES}/hcp1065/{stem}.nii.gz",
        labels_url=f"{_YEH_RELEASES}/hcp1065/{stem}.txt",
    )


def _build_catalogue() -> dict[str, CatalogueEntry]:
    entries = [_schaefer_entry(p, n) for p in (100, 200, 400, 1000) for n in (7, 17)]
    entries += [_tian_entry(s) for s in (1, 2, 3)]
    entries += [_schaefer_tian_entry(s, 400, 17) for s in (1, 2, 3)]
    entries.append(_hcp1065_entry())
    return {entry.name: entry for entry in entries}


#: Standard parcellations, downloaded on first use.
CATALOGUE: dict[str, CatalogueEntry] = _build_catalogue()
