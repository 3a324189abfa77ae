"""Experiments: model comparisons over seeds and tasks, the demo, and the paper's Params/FLOPs tables."""
