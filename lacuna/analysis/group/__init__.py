"""Group-level statistics: the permutation GLM, TFCE and their compiled kernels."""
