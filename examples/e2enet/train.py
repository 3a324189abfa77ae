"""Train one fold of E2ENet (or the DynUNet baseline) on an nnU-Net-layout dataset.

The command line lives in :mod:`e2enet.training.train`; ``--help`` lists its flags."""

from e2enet.training.train import main

if __name__ == "__main__":
    main()
