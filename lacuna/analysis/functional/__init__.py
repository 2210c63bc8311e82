"""Functional lesion network mapping: the analysis, its one-pass engine over the connectome, the compiled kernels and the t statistics."""
