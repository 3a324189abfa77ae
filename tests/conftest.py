import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Tests import their shared hypothesis strategies as a plain module, and the E2ENet example's modules the way
# its scripts import each other (`python examples/e2enet/train.py` puts that folder on sys.path).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples" / "e2enet"))

# pytest-xdist runs one worker per core; intra-op threads on top would oversubscribe the cores, and small ops
# then spend their time in thread hand-offs (measured 100x slower on a busy 2-core machine).
torch.set_num_threads(1)
