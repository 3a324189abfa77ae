"""The E2ENet demo end to end on the embedded MNI data.

The command line lives in :mod:`e2enet.experiments.demo`; ``--help`` lists its flags."""

import torch

from e2enet.experiments.demo import main

if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))  # two runs share 2 cores
    main()
