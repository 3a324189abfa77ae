"""Raw datasets in the nnU-Net v2 layout: reading, verification, MSD conversion and the embedded MNI tasks."""
