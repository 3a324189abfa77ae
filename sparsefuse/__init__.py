"""sparsefuse: dynamic sparse training for PyTorch."""
from . import distribution, growth, masks, schedules, scorers
from .sparsity import DynamicSparsity, LayerUpdate, UpdateReport
from . import nn
from .accounting import count_params, count_flops, pt_score
