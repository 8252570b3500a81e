"""Tools for testing feature-detection code and mask semantics with minivmm.

``minivmm.testing.strategies`` holds hypothesis strategies (profiles, feature sets,
masks in every format, EVC modes, clusters) for property-based tests of your own.
"""
