import torch

# pytest-xdist runs one worker per core; intra-op threads on top would oversubscribe the cores, and small ops
# then spend their time in thread hand-offs (measured 100x slower on a busy 2-core machine).
torch.set_num_threads(1)
