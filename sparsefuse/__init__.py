"""sparsefuse: dynamic sparse training for PyTorch."""

from . import distributed, distribution, growth, masks, nn, schedules, scorers
from .accounting import count_flops, count_params, pt_score
from .compact import CompactLayer, LayerCompaction, compact, compaction_plan, load_sparse_state_dict, sparse_state_dict
from .sparsity import DynamicSparsity, LayerUpdate, UpdateReport

__all__ = [
    "DynamicSparsity",
    "LayerUpdate",
    "UpdateReport",
    "count_flops",
    "count_params",
    "pt_score",
    "compact",
    "compaction_plan",
    "CompactLayer",
    "LayerCompaction",
    "sparse_state_dict",
    "load_sparse_state_dict",
    "distributed",
    "distribution",
    "growth",
    "masks",
    "nn",
    "schedules",
    "scorers",
]
