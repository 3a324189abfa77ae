"""Compaction: turn masked-off channels into layers that are really smaller, so sparsity saves time.

Masked weights are zeros inside dense tensors: a masked model costs what the dense one costs. When masks leave an
input channel of a layer entirely dead (no active weight reads it), that channel can be cut out of the layer, and
when they leave an output channel dead it need not be computed. [`compact`][sparsefuse.compaction.compact] builds a
copy of the model in which every such layer is a [`CompactLayer`][sparsefuse.compaction.CompactLayer]: a gather of
the live input channels, a smaller dense layer holding only the live weights, and a scatter of the live output
channels back to full width. The copy computes what the masked model computes (to float rounding) with the same
input and output shapes, so it drops into any model.

Any granularity works; ``"input_channel"`` ([`InputChannel`][sparsefuse.masks.InputChannel]) and ``"channel"``
make whole channels dead by construction, while with ``"kernel"`` or ``"element"`` masks an input channel is dead
only if every filter's kernel (every weight) for it is inactive.

[`CompactedTraining`][sparsefuse.compaction.CompactedTraining] does the same during training: between two topology
updates it trains the compacted layers, whose smaller weights are Parameters, and puts everything back into the
masked model at each update and for every checkpoint.
"""

from .modules import CompactLayer, compact
from .plan import MIN_DEAD_INPUTS, MIN_DEAD_OUTPUTS, LayerCompaction, compaction_plan
from .training import CompactedTraining, TrainableCompactLayer

__all__ = [
    "compact",
    "compaction_plan",
    "CompactLayer",
    "LayerCompaction",
    "CompactedTraining",
    "TrainableCompactLayer",
    "MIN_DEAD_INPUTS",
    "MIN_DEAD_OUTPUTS",
]
