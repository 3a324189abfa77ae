"""Dataset fingerprint, experiment plans and splits, and the per-case preprocessing with its cache."""
