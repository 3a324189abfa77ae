import sys
from pathlib import Path

import torch

# tests import their shared hypothesis strategies as a plain module
sys.path.insert(0, str(Path(__file__).parent))

# pytest-xdist runs one worker per core; intra-op threads on top would oversubscribe the cores, and small ops
# then spend their time in thread hand-offs (measured 100x slower on a busy 2-core machine).
torch.set_num_threads(1)
