"""sparsefuse: dynamic sparse training for PyTorch."""

from . import compaction, distributed, distribution, growth, masks, nn, schedules, scorers, serialization
from .accounting import count_flops, count_params
from .compaction import CompactedTraining, CompactLayer, LayerCompaction, compact, compaction_plan
from .protocol import Sparsity
from .reports import LayerUpdate, UpdateReport
from .serialization import load_sparse_state_dict, sparse_state_dict
from .sparsity import DynamicSparsity

__all__ = [
    "DynamicSparsity",
    "Sparsity",
    "LayerUpdate",
    "UpdateReport",
    "count_flops",
    "count_params",
    "compact",
    "compaction_plan",
    "CompactLayer",
    "LayerCompaction",
    "CompactedTraining",
    "sparse_state_dict",
    "load_sparse_state_dict",
    "compaction",
    "distributed",
    "distribution",
    "growth",
    "masks",
    "nn",
    "schedules",
    "scorers",
    "serialization",
]
