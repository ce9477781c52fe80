"""Leakage: near-copies of evaluation images, excluded from a build (``exclude``) or found in a release (``audit``)."""
