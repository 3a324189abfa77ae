"""E2ENet (Liu et al., arXiv 2312.04727) as the authors' code builds it.

Architecture (see docs/authors-code.md), for ``L = num_pools + 1``
levels with widths ``c_i = min(base_channels * 2**i, max_channels)``:

* **Conv unit**: depth shift + Conv3d (1, 3, 3), padding (0, 1, 1), bias
  (:class:`sparsefuse.nn.DepthShiftConv3d`) -> InstanceNorm3d(affine, eps 1e-5) ->
  LeakyReLU(0.01). With ``shift_dim`` 3 or 4 the kernel's 1 moves to that axis
  ((3, 1, 3) / (3, 3, 1)), as in the authors' shift-axis ablation.
* **Encoder** (backbone): ``encoder_units`` conv units per level; the first unit
  of level ``l >= 1`` downsamples with stride ``strides[l - 1]``. Output x(l, 0).
* **Fusion nodes** (DSFF) x(i, j) for j = 1..L-1, i = 0..L-1-j:
  ``concat[x(i, j-1), Up(x(i+1, j-1)), Down(x(i-1, j-1)) if i >= 1]`` along channels,
  with Up a node-specific ConvTranspose3d c_{i+1} -> c_i (kernel = stride =
  ``strides[i]``, no bias) and Down a MaxPool3d (kernel = stride = ``strides[i-1]``).
  So the node input has ``c_{i-1} + 2 c_i`` channels (``2 c_0`` at level 0). Nodes
  on the last diagonal (i + j = L-1) have ``last_diagonal_units`` conv units, the
  others ``fusion_units`` (first unit C_in -> c_i, the rest c_i -> c_i).
* **Heads**: 1x1x1 Conv3d without bias (``head_bias=False``), ``heads[k]`` on x(k, L-1-k), k = 0..L-3
  (deep supervision), or only ``heads[0]`` without deep supervision.
* **Init**: Kaiming-normal (a = 0.01, fan-in, leaky-ReLU gain) on every Conv3d and
  ConvTranspose3d weight; conv biases 0.

Module names and the authors' names (``Generic_UNetPlusPlus`` in ``unetpp_d.py``),
with z = L-1-(i+j) and m = j-1, so x(0, 1) is ``up4.0``/``loc4.0`` and x(0, 5) is
``up0.4``/``loc0.4`` (paper notation: x(i, j) is x^{j, i+1}):

=====================================  =========================================
here                                   authors
=====================================  =========================================
``encoder.{l}.{u}.conv``               ``conv_blocks_context.{l}.blocks.{u}.conv``
                                       (bottleneck: ``conv_blocks_context.5.{u}.blocks.0.conv``)
``fusion.{i}_{j}.up``                  ``up{z}.{m}``
``fusion.{i}_{j}.down``                ``down{z}.{m}``
``fusion.{i}_{j}.convs.{u}.conv``      ``loc{z}.{m}.{u}.blocks.0.conv``
``heads.{k}``                          ``seg_outputs.{k}``
=====================================  =========================================

The sparsifiable set is all ``fusion.*`` conv and transposed-conv weights
(:func:`e2enet_fusion_targets`): 20 + 15 = 35 tensors, 18,067,200 weights in the
paper preset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import sparsefuse as sf
from sparsefuse.validation import positive_int

__all__ = [
    "PRESETS",
    "E2ENet",
    "build_e2enet",
    "e2enet_fusion_targets",
    "is_fusion_conv",
]

Stride = tuple[int, int, int]
STEMS = ("shift", "plain", "full")
DOWNSAMPLINGS = ("unit", "shift", "full")

# Keyword arguments of E2ENet per preset. "paper" is the authors' network as trained for AMOS/BTCV/BraTS (5
# isotropic (2,2,2) pools, 48 -> 320 channels). "cpu-demo" keeps the topology (dense fusion, transposed convs, deep
# supervision) at a size that trains on 2 CPU cores, with the changes that the ablations in docs/results/log.md
# call for: a 3x3x3 stem (the authors' shifted (1,3,3) first conv sees one slice of a
# 1-channel image, and thin structures were never learnt); no depth shift, which at these widths (groups of 4
# channels) and budgets cost accuracy and left classes unlearnt on some seeds; 3x3x3 strided convs, because without
# the shift a (1,3,3) stride-2 conv reads every other slice and the deep levels learnt context late; and widths
# 12 -> 64, which give it the parameters of the DynUNet baseline (351k for both).
PRESETS: dict[str, dict] = {
    "paper": dict(base_channels=48, max_channels=320, num_pools=5),
    "cpu-demo": dict(base_channels=12, max_channels=64, num_pools=3, stem="full", shift=False, downsampling="full"),
}


def _as_stride(s, index: int) -> Stride:
    t = (s, s, s) if isinstance(s, int) and not isinstance(s, bool) else tuple(s)
    if len(t) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t):
        raise ValueError(
            f"strides[{index}] must be a positive int or a (D, H, W) tuple of positive ints "
            f"such as (2, 2, 2) or (1, 2, 2), got {s!r}"
        )
    return t


def stride_product(strides: Sequence[int | Sequence[int]]) -> Stride:
    """Per-axis product of (D, H, W) strides; an int stride applies to all three axes."""
    total = [1, 1, 1]
    for stride in strides:
        for axis, s in enumerate((stride,) * 3 if isinstance(stride, int) else stride):
            total[axis] *= s
    return tuple(total)


def _pool_strides(strides: Sequence[int | Sequence[int]] | None, num_pools: int) -> tuple[Stride, ...]:
    """``strides`` as num_pools (D, H, W) tuples; None: all (2, 2, 2)."""
    if strides is None:
        strides = [(2, 2, 2)] * num_pools
    if len(strides) != num_pools:
        raise ValueError(f"strides must have num_pools={num_pools} entries, got {len(strides)}: {strides!r}")
    return tuple(_as_stride(s, k) for k, s in enumerate(strides))


def _unit_settings(
    shift: bool, shift_groups: int, shift_dim: int, min_shift_group_channels: int, stem: str, downsampling: str
) -> tuple[dict, dict, dict]:
    """The checked :class:`ConvUnit` keyword arguments of (every other unit, the stem, the strided first unit of
    each level below the first), from E2ENet's arguments of the same names."""
    positive_int("shift_groups", shift_groups)
    if downsampling == "shift" and shift_groups == 1:
        raise ValueError('downsampling="shift" needs shift_groups > 1 (the groups its strided convs shift)')
    strided_shift_groups = shift_groups  # downsampling="shift" shifts the strided convs even without the shift
    if not shift:
        shift_groups = 1
    positive_int("min_shift_group_channels", min_shift_group_channels)
    if shift_dim not in (2, 3, 4):
        raise ValueError(f"shift_dim must be 2 (depth), 3 (height) or 4 (width), got {shift_dim!r}")
    if downsampling not in DOWNSAMPLINGS:
        raise ValueError(
            f"downsampling must be one of {DOWNSAMPLINGS} (the strided first unit of each encoder level), "
            f"got {downsampling!r}"
        )
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS} (the conv that reads the image), got {stem!r}")
    unit = dict(shift_groups=shift_groups, shift_dim=shift_dim, min_shift_group_channels=min_shift_group_channels)
    stem_unit = {**unit, "shift_groups": 1 if stem == "plain" else shift_groups, "full_kernel": stem == "full"}
    strided_unit = {
        **unit,
        "shift_groups": strided_shift_groups if downsampling == "shift" else shift_groups,
        "full_kernel": downsampling == "full",
    }
    return unit, stem_unit, strided_unit


class ConvUnit(nn.Module):
    """(Depth-shift) conv -> InstanceNorm3d -> LeakyReLU, the authors' basic block.

    Shape: (B, in_channels, D, H, W) -> (B, out_channels, D/s_d, H/s_h, W/s_w) for stride s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: Stride = (1, 1, 1),
        shift_groups: int = 3,
        shift_dim: int = 2,
        full_kernel: bool = False,
        min_shift_group_channels: int = 1,
    ) -> None:
        super().__init__()
        if min_shift_group_channels > 1 and in_channels // shift_groups < min_shift_group_channels:
            shift_groups = 1  # groups this thin move most of the layer's input off its slice: a plain conv
        # Kernel 3 on the two axes not shifted, 1 on the shifted one: the shift
        # supplies the receptive field along that axis. A full 3x3x3 kernel needs no shift.
        kernel = tuple(1 if axis == shift_dim and not full_kernel else 3 for axis in (2, 3, 4))
        if full_kernel:
            shift_groups = 1
        padding = tuple(k // 2 for k in kernel)
        if shift_groups > 1:
            self.conv = sf.nn.DepthShiftConv3d(
                in_channels,
                out_channels,
                kernel,
                shift_groups=shift_groups,
                shift_dim=shift_dim,
                stride=stride,
                padding=padding,
                bias=True,
            )
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=True)
        # nn.InstanceNorm3d that keeps channels_last_3d on the CPU, where train.py runs the network.
        self.norm = sf.nn.ChannelsLastInstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FusionNode(nn.Module):
    """One DSFF node x(i, j): concat the forward, upsampled and pooled inputs, then convs.

    Args:
        c_prev: channels of level i-1 (None at level 0, which has no downward input).
        c_here: channels c_i of this level (the output width).
        c_next: channels c_{i+1} of the level below.
        up_stride: pool between levels i and i+1 (kernel and stride of ``up``).
        down_stride: pool between levels i-1 and i (None at level 0).
        units: conv units; the first maps c_prev + 2 c_here (2 c_here at level 0) -> c_here.

    Shapes: ``same`` (B, c_i, S), ``below`` (B, c_{i+1}, S / up_stride), ``above``
    (B, c_{i-1}, S * down_stride) -> (B, c_i, S).
    """

    def __init__(
        self,
        c_prev: int | None,
        c_here: int,
        c_next: int,
        up_stride: Stride,
        down_stride: Stride | None,
        units: int,
        shift_groups: int,
        shift_dim: int,
        min_shift_group_channels: int = 1,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(c_next, c_here, up_stride, stride=up_stride, bias=False)
        self.down = nn.MaxPool3d(down_stride, stride=down_stride) if down_stride is not None else None
        c_in = 2 * c_here + (c_prev or 0)
        self.convs = nn.Sequential(
            *(
                ConvUnit(
                    c_in if u == 0 else c_here,
                    c_here,
                    shift_groups=shift_groups,
                    shift_dim=shift_dim,
                    min_shift_group_channels=min_shift_group_channels,
                )
                for u in range(units)
            )
        )

    def forward(self, same: torch.Tensor, below: torch.Tensor, above: torch.Tensor | None = None) -> torch.Tensor:
        # Order matters for the shift: channel groups cut across the concatenated sources.
        parts = [same, self.up(below)]
        if self.down is not None:
            parts.append(self.down(above))
        return self.convs(torch.cat(parts, dim=1))


class E2ENet(nn.Module):
    """E2ENet: shift-conv encoder, dense sparse-fusion (DSFF) decoder, deep supervision.

    Args:
        in_channels: image channels (1 for CT, 4 for BraTS MRI).
        num_classes: output classes, background included.
        base_channels: width c_0 of level 0 (paper: 48); doubles per level.
        max_channels: width cap (paper: 320).
        num_pools: downsamplings; the net has num_pools + 1 levels (paper: 5). >= 2.
        strides: per-pool (D, H, W) strides, length num_pools; default all (2, 2, 2).
            Anisotropic data wants e.g. (1, 2, 2) first.
        encoder_units: conv units per encoder level (paper: 2).
        fusion_units: conv units per fusion node off the last diagonal (paper: 1).
        last_diagonal_units: conv units per node with i + j = num_pools (paper: 2).
        shift_groups: channel groups of the depth shift (3: shifts -1, 0, +1, the
            paper; 5: -2..+2, the released code). 1 disables the shift (plain Conv3d).
        shift_dim: axis shifted, 2 = depth (paper), 3 = height, 4 = width.
        shift: False disables the shift whatever shift_groups says.
        min_shift_group_channels: a conv whose input gives each shift group fewer channels
            than this runs unshifted (paper: 1, every conv shifted). At narrow widths most of
            a thin layer's input is then moved off its slice.
        deep_supervision: True builds num_pools - 1 heads and returns all of them in
            training; False builds and returns only the full-resolution head.
        stem: the first conv, the one that reads the image. ``"shift"`` (the authors'): a
            shift conv like every other. With few image channels that is a poor fit: a
            1-channel image is a single shift group, so the whole image moves one slice and
            the conv sees no depth context. ``"plain"``: the (1, 3, 3) conv without shift.
            ``"full"``: a 3x3x3 conv, real depth context where the image enters, for
            ``in_channels x c_0 x 27`` weights (216 for one channel at width 8).
        head_bias: a bias in the 1x1x1 output convs (the authors', like nnU-Net's, have none;
            MONAI's DynUNet has one).
        downsampling: the strided first unit of each encoder level below the first. ``"unit"``
            (the authors'): a unit like every other. Without the shift its (1, 3, 3) kernel
            with stride 2 along depth reads every other slice only, so the deeper encoder
            levels see an aliased subsample of the depth axis. ``"full"``: a 3x3x3 kernel, which
            reads every slice; ``"shift"``: a shift conv there even where the shift is off.

    Shape:
        input (B, in_channels, D, H, W), each of D, H, W divisible by
        :attr:`total_stride` on its axis. Training with deep supervision: a list of
        num_pools - 1 logit maps, full resolution first, then each downsampled by the
        next stride (paper: scales 1, 1/2, 1/4, 1/8). Otherwise (eval, or no deep
        supervision): logits (B, num_classes, D, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base_channels: int = 48,
        max_channels: int = 320,
        num_pools: int = 5,
        strides: Sequence[int | Sequence[int]] | None = None,
        encoder_units: int = 2,
        fusion_units: int = 1,
        last_diagonal_units: int = 2,
        shift_groups: int = 3,
        shift_dim: int = 2,
        shift: bool = True,
        min_shift_group_channels: int = 1,
        deep_supervision: bool = True,
        stem: str = "shift",
        head_bias: bool = False,
        downsampling: str = "unit",
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("num_classes", num_classes)
        positive_int("base_channels", base_channels)
        positive_int("max_channels", max_channels)
        # Two pools is the smallest net with a deep-supervision head below full resolution.
        positive_int("num_pools", num_pools, minimum=2)
        positive_int("encoder_units", encoder_units)
        positive_int("fusion_units", fusion_units)
        positive_int("last_diagonal_units", last_diagonal_units)
        self.strides: tuple[Stride, ...] = _pool_strides(strides, num_pools)
        unit, stem_unit, strided_unit = _unit_settings(
            shift, shift_groups, shift_dim, min_shift_group_channels, stem, downsampling
        )

        levels = num_pools + 1
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.channels: tuple[int, ...] = tuple(min(base_channels * 2**i, max_channels) for i in range(levels))
        self.encoder = self._build_encoder(encoder_units, unit, stem_unit, strided_unit)
        self.fusion = self._build_fusion(fusion_units, last_diagonal_units, unit)
        num_heads = levels - 2 if deep_supervision else 1
        self.heads = nn.ModuleList(
            nn.Conv3d(self.channels[k], num_classes, 1, bias=head_bias) for k in range(num_heads)
        )
        self._init_weights()

    def _build_encoder(self, units: int, unit: dict, stem_unit: dict, strided_unit: dict) -> nn.ModuleList:
        """``units`` conv units per level; the first unit of level 0 is the stem, that of any other level strided."""
        c = self.channels
        return nn.ModuleList(
            nn.Sequential(
                *(
                    ConvUnit(
                        (self.in_channels if level == 0 else c[level - 1]) if u == 0 else c[level],
                        c[level],
                        stride=self.strides[level - 1] if (u == 0 and level > 0) else (1, 1, 1),
                        **(stem_unit if level == 0 and u == 0 else strided_unit if u == 0 else unit),
                    )
                    for u in range(units)
                )
            )
            for level in range(len(c))
        )

    def _build_fusion(self, fusion_units: int, last_diagonal_units: int, unit: dict) -> nn.ModuleDict:
        """The fusion nodes ``"i_j"``, in the authors' compute order."""
        c, levels = self.channels, len(self.channels)
        fusion = nn.ModuleDict()
        for i, j in self._node_order(levels):
            fusion[f"{i}_{j}"] = FusionNode(
                c_prev=c[i - 1] if i > 0 else None,
                c_here=c[i],
                c_next=c[i + 1],
                up_stride=self.strides[i],
                down_stride=self.strides[i - 1] if i > 0 else None,
                units=last_diagonal_units if i + j == levels - 1 else fusion_units,
                **unit,
            )
        return fusion

    @staticmethod
    def _node_order(levels: int) -> list[tuple[int, int]]:
        """Fusion nodes (i, j) in the authors' compute order: after encoder level l,
        the anti-diagonal i + j = l from the deepest node (i = l-1, j = 1) up to x(0, l).
        Each node's inputs lie on the two earlier diagonals or earlier on its own."""
        return [(level - j, j) for level in range(1, levels) for j in range(1, level + 1)]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def total_stride(self) -> Stride:
        """Product of all strides per axis: every input dim must be a multiple of it."""
        return stride_product(self.strides)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the fix unless ``x`` is (B, in_channels, D, H, W) with every dim a multiple of
        :attr:`total_stride` and more than one voxel at the bottleneck."""
        if x.dim() != 5 or x.size(1) != self.in_channels:
            raise ValueError(
                f"E2ENet expects input (B, {self.in_channels}, D, H, W) (in_channels={self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        patch, multiple = tuple(x.shape[2:]), self.total_stride
        if any(p % m for p, m in zip(patch, multiple, strict=True)):
            fixed = tuple(max(m, round(p / m) * m) for p, m in zip(patch, multiple, strict=True))
            raise ValueError(
                f"patch (D, H, W) = {patch} is not divisible by the network's total stride {multiple} "
                f"({len(self.strides)} downsamplings with strides {list(self.strides)}); every dim must be a "
                f"multiple of it, e.g. patch {fixed}"
            )
        if all(p == m for p, m in zip(patch, multiple, strict=True)):
            # InstanceNorm (statistics of each sample, also in eval) cannot normalise a
            # single voxel; torch would raise deep inside the net.
            raise ValueError(
                f"patch (D, H, W) = {patch} leaves one voxel at the bottleneck, which InstanceNorm cannot "
                f"normalise; use a patch of at least twice the total stride {multiple} on one axis"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, in_channels, D, H, W) -> logits; see the class docstring for the training list."""
        self.check_input(x)
        levels = len(self.encoder)
        # grid[i][j] = x(i, j); grid[i][0] is the encoder output of level i.
        grid: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        h = x
        for level, block in enumerate(self.encoder):
            h = block(h)
            grid[level].append(h)
            for j in range(1, level + 1):
                i = level - j
                above = grid[i - 1][j - 1] if i > 0 else None
                grid[i].append(self.fusion[f"{i}_{j}"](grid[i][j - 1], grid[i + 1][j - 1], above))
        if self.training and self.deep_supervision:
            return [head(grid[k][levels - 1 - k]) for k, head in enumerate(self.heads)]
        # Inference needs only the full-resolution map; the authors also ran the
        # other heads and discarded them (their published FLOPs include those heads).
        return self.heads[0](grid[0][levels - 1])


def build_e2enet(preset: str = "paper", *, in_channels: int, num_classes: int, **overrides) -> E2ENet:
    """Build an :class:`E2ENet` from a named preset ("paper" or "cpu-demo").

    ``overrides`` are E2ENet keyword arguments that replace the preset's, e.g.
    ``build_e2enet("paper", in_channels=1, num_classes=16, shift_groups=5)``.
    Build under ``with torch.device("meta"):`` for instant, memory-free accounting.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return E2ENet(in_channels, num_classes, **{**PRESETS[preset], **overrides})


def _under_fusion(name: str) -> bool:
    # Name components, so a wrapper prefix ("module.", "_orig_mod.") still matches.
    return "fusion" in name.split(".")


def e2enet_fusion_targets(name: str, module: nn.Module) -> bool:
    """Sparsifier target predicate: all fusion conv and transposed-conv weights.

    ``(qualified module name, module) -> bool``; True for ``fusion.*.convs.*.conv``
    (Conv3d, shift or not) and ``fusion.*.up`` (ConvTranspose3d), as the authors'
    masking selected them. Backbone, heads, biases and norms stay dense.
    """
    return _under_fusion(name) and isinstance(module, (nn.Conv3d, nn.ConvTranspose3d))


def is_fusion_conv(name: str, module: nn.Module) -> bool:
    """True for the fusion nodes' Conv3d layers (not their transposed convs).

    This is the ``bias_term`` predicate of `e2enet.experiments.paper_counting.eq5_flops` that
    reproduces the published FLOPs: the authors charged eq. 5's "+1" only here.
    """
    return _under_fusion(name) and isinstance(module, nn.Conv3d)
