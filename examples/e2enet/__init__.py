"""E2ENet, the sparsefuse flagship: 3D medical image segmentation with dynamic sparse feature fusion.

The folders are nnU-Net v2's seams: ``dataset`` (the raw layout, verification, the embedded MNI tasks),
``preprocessing`` (fingerprint, plans, normalisation and resampling), ``nets`` (E2ENet, the DynUNet baseline, the
registry by name), ``training`` (run config, loop, loss, loader, checkpoints, run folder, DDP), ``inference``
(prediction, E2ENet-wide compaction, ONNX export), ``evaluation`` (metrics and scoring) and ``experiments`` (compare,
demo, the paper's tables). The scripts beside them are the command lines: ``python examples/e2enet/train.py ...``."""
