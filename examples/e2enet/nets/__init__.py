"""The networks: E2ENet, MONAI's DynUNet as the nnU-Net baseline, and the registry that builds them by name."""
