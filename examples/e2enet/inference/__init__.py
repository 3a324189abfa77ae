"""Inference: sliding-window prediction with TTA and fold ensembles, E2ENet-wide compaction, ONNX export."""
