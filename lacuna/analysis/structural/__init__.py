"""Structural lesion network mapping (disconnection) against a tractogram index."""
