"""Segment NIfTI images with trained folds.

The command line lives in :mod:`e2enet.inference.predict`; ``--help`` lists its flags."""

from e2enet.inference.predict import main

if __name__ == "__main__":
    main()
