"""Merging: pure per-method tensor functions and the resident-source backend."""
