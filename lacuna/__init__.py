"""Lacuna: a BIDS App for lesion network mapping.

Load binary lesion masks (:class:`SubjectData`), run analyses
(:mod:`lacuna.analysis`), and export BIDS derivatives (:mod:`lacuna.io`).
"""

from lacuna._version import __version__
from lacuna.core.errors import LacunaError
from lacuna.core.subject import SubjectData

__all__ = ["LacunaError", "SubjectData", "__version__"]
