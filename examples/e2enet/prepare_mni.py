"""Build an embedded MNI task in the nnU-Net layout.

The command line lives in :mod:`e2enet.dataset.mni`; ``--help`` lists its flags."""

from e2enet.dataset.mni import main

if __name__ == "__main__":
    raise SystemExit(main())
