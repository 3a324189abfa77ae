"""Score predicted segmentations against references.

The command line lives in :mod:`e2enet.evaluation.evaluate`; ``--help`` lists its flags."""

from e2enet.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
