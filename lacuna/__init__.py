"""Lacuna: a BIDS App for lesion network mapping.

Load binary lesion masks (:class:`SubjectData`), run analyses
(:mod:`lacuna.analysis`), and export BIDS derivatives (:mod:`lacuna.io`).
"""

from lacuna._lazy import lazy_exports
from lacuna._version import __version__

__all__ = ["LacunaError", "SubjectData", "__version__"]

__getattr__, __dir__ = lazy_exports(
    __name__, {"LacunaError": "lacuna.core.errors", "SubjectData": "lacuna.core.subject"}
)
