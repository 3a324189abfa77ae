"""E2ENet's Params, FLOPs and PT score, as the paper's tables count them.

The command line lives in :mod:`e2enet.experiments.accounting`; ``--help`` lists its flags."""

from e2enet.experiments.accounting import main

if __name__ == "__main__":
    main()
