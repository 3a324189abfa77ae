"""Compare E2ENet settings and the DynUNet baseline under one budget, over seeds.

The command line lives in :mod:`e2enet.experiments.compare`; ``--help`` lists its flags."""

import torch

from e2enet.experiments.compare import main

if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))  # two runs share 2 cores
    main()
