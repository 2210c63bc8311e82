"""Names of the coordinate spaces Lacuna accepts (no numerical imports: the CLI's
option choices use them)."""

#: Spaces a lesion mask may be declared in.
SUPPORTED_SPACES = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")

#: Spaces analysed in the coordinate system of a supported space. The ICBM 2009
#: nonlinear templates (2009a/b/c, symmetric and asymmetric) are releases of one
#: template family registered to the same MNI frame: Lacuna treats them as one coordinate
#: system (identity onto MNI152NLin2009cAsym), warns once per run and records the
#: approximation in provenance (:func:`lacuna.core.spaces.frame_approximation`). Atlases published in 2009a
#: (HCP1065) are likewise used on 2009c grids without a transform.
EQUIVALENT_SPACES = {
    "MNI152NLin2009aAsym": "MNI152NLin2009cAsym",
    "MNI152NLin2009aSym": "MNI152NLin2009cAsym",
    "MNI152NLin2009bAsym": "MNI152NLin2009cAsym",
    "MNI152NLin2009bSym": "MNI152NLin2009cAsym",
    "MNI152NLin2009cSym": "MNI152NLin2009cAsym",
}

#: Every space name a mask may declare.
ACCEPTED_SPACES = (*SUPPORTED_SPACES, *EQUIVALENT_SPACES)
