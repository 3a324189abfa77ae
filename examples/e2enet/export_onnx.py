"""Export one trained fold to ONNX.

The command line lives in :mod:`e2enet.inference.onnx_export`; ``--help`` lists its flags."""

from e2enet.inference.onnx_export import main

if __name__ == "__main__":
    main()
