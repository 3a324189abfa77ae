"""Evaluation: per-case segmentation metrics and the scoring of prediction folders."""
