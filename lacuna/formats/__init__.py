"""File formats Lacuna reads and writes: the HDF5 functional connectome
(:mod:`.functional_connectome`), GSP1000 conversion (:mod:`.gsp1000`) and TrackVis to
MRtrix3 tractograms (:mod:`.tractograms`)."""
