"""Verify, convert, plan and preprocess, or sample an nnU-Net-layout dataset.

The command line lives in :mod:`e2enet.dataset.cli`; ``--help`` lists its flags."""

from e2enet.dataset.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
