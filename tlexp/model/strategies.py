"""Which backbone modules a fine-tuning strategy unfreezes in phase B (the reference study's definitions).

- ``layers_N``: the modules behind the last N operations of the backbone's traced graph (Keras's
  layer count: conv, norm, activation, residual add, ...), and the weights an op reads itself, up to
  the last op before global pooling.
- ``blocks_N``: the last N architectural blocks (ResNet and RegNet bottlenecks, inverted-residual blocks with
  stem and last conv, VGG stages, ViT encoder layers, DenseNet dense blocks, MaxViT stages, timm's
  own block grouping); layers with weights after the last block (a closing norm, the Linear layers a
  classifier keeps) train with it.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from tlexp.errors import TlexpError
from tlexp.model.backbones import Backbone

_PATTERN = re.compile(r"^(frozen|full|(layers|blocks)_(\d+))$")
NAMED = ("frozen", "layers_5", "layers_10", "layers_40", "blocks_2", "blocks_4", "blocks_10", "full")


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # frozen | full | layers | blocks
    n: int = 0

    @property
    def trains_backbone(self) -> bool:
        return self.kind != "frozen"


def parse_strategy(name: str) -> Strategy:
    match = _PATTERN.match(str(name))
    if not match or (match.group(3) is not None and int(match.group(3)) < 1):
        raise TlexpError(f"unknown strategy '{name}': use one of {', '.join(NAMED)}, or layers_N / blocks_N with N >= 1")
    if match.group(2):
        return Strategy(name=name, kind=match.group(2), n=int(match.group(3)))
    return Strategy(name=name, kind=name)


@dataclass(frozen=True)
class Unit:
    """A named group of modules that is unfrozen together (one block, or one traced op).

    ``params``: weights a traced function reads itself rather than through a module call
    (ConvNeXt's layer scale and LayerNorm2d, timm's BatchNormAct2d, ViT's class token).
    """

    name: str
    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...] = ()

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()] + list(self.params)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _expand_sequentials(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Open plain Sequential/ModuleList containers (stages), keep everything else whole."""
    out = []
    for name, module in named:
        if type(module) in (nn.Sequential, nn.ModuleList):
            out += _expand_sequentials([(f"{name}.{child}", m) for child, m in module.named_children()])
        else:
            out.append((name, module))
    return out


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _units(named: list[tuple[str, nn.Module]]) -> list[Unit]:
    """One unit per module with weights; a bare norm layer of an opened Sequential is no block of its own:
    it joins its layer, the one before it in its container (MnasNet's and ShuffleNet's conv, BN), or, first
    there, the one after (ConvNeXt's downsampling LayerNorm, conv), else the unit before (a closing norm)."""
    items = [(n, m) for n, m in _expand_sequentials(named) if _has_params(m)]
    parent = lambda i: items[i][0].rpartition(".")[0]
    groups: list[list[int]] = []
    for i, (_, module) in enumerate(items):
        lone = isinstance(module, _NORMS) and bool(groups)
        if lone and parent(groups[-1][-1]) == parent(i):
            groups[-1].append(i)
        elif isinstance(module, _NORMS) and i + 1 < len(items) and parent(i + 1) == parent(i):
            groups.append([i, None])  # placeholder: the next layer completes this group
        elif lone:
            groups[-1].append(i)
        elif groups and groups[-1][-1] is None:
            groups[-1][-1] = i
        else:
            groups.append([i])
    return [Unit(",".join(items[i][0] for i in g), tuple(items[i][1] for i in g)) for g in groups]


def _vit_layers(body: nn.Module) -> list[Unit]:
    return [Unit(f"encoder.layers.{n}", (m,)) for n, m in body.encoder.layers.named_children()]


def _vgg_stages(body: nn.Module) -> list[Unit]:
    """A VGG block is a stage: the convolutions up to and including a max-pool."""
    stages, current = [], []
    for module in body.features:
        current.append(module)
        if isinstance(module, nn.MaxPool2d):
            stages.append(Unit(f"features.stage{len(stages) + 1}", tuple(current)))
            current = []
    return stages


def _resnet_blocks(body: nn.Module) -> list[Unit]:
    return _units([(f"layer{i}", getattr(body, f"layer{i}")) for i in range(1, 5)])


def _regnet_blocks(body: nn.Module) -> list[Unit]:
    """Its residual blocks, as ResNet's: its stages (AnyStage) subclass Sequential, so no rule opened them and
    blocks_2 of regnet_y_400mf was two whole stages, 10 of its 16 blocks."""
    stages = body.trunk_output.named_children()
    return _units([(f"trunk_output.{s}.{b}", m) for s, stage in stages for b, m in stage.named_children()])


def _densenet_blocks(body: nn.Module) -> list[Unit]:
    """A dense block with the layer after it, transition or closing norm5: else blocks_1 is norm5 alone."""
    features = body.features._modules
    dense = [n for n in features if n.startswith("denseblock")]
    after = [f"transition{n.removeprefix('denseblock')}" for n in dense[:-1]] + ["norm5"]
    return [Unit(f"features.{d},features.{a}", (features[d], features[a])) for d, a in zip(dense, after)]


# Per-architecture knowledge, one row per torchvision family (first match wins): what its blocks
# are. A family without a row: the children of its ``features`` (MobileNet, EfficientNet, ...), else
# of the body. timm models need no row: each declares its own grouping (``group_matcher``).
TORCHVISION_BLOCKS = (
    (torchvision.models.VisionTransformer, _vit_layers),
    (torchvision.models.VGG, _vgg_stages),
    (torchvision.models.ResNet, _resnet_blocks),
    (torchvision.models.RegNet, _regnet_blocks),
    (torchvision.models.DenseNet, _densenet_blocks),
    (torchvision.models.MaxVit, lambda body: [Unit(f"blocks.{i}", (m,)) for i, m in enumerate(body.blocks)]),
)


def _generic_blocks(body: nn.Module) -> list[Unit]:
    return _units([("features", body.features)] if hasattr(body, "features") else list(body.named_children()))


def _torchvision_blocks(body: nn.Module) -> list[Unit]:
    blocks_of = next((rule for family, rule in TORCHVISION_BLOCKS if isinstance(body, family)), _generic_blocks)
    return _with_layers_after_the_last_block(body, blocks_of(body))


def _with_layers_after_the_last_block(body: nn.Module, units: list[Unit]) -> list[Unit]:
    """Layers with weights after the last block and in none train with it, as timm groups them (conv_head with
    the last block): norms (ViT's encoder.ln, Swin's norm, ConvNeXt's pre-pooling LayerNorm) and the layers a
    classifier keeps before the replaced Linear (MobileNetV3's, AlexNet's, VGG's fc6/fc7, MaxViT's pre-logits).
    Else no blocks_N trained them, though they sit nearest the head: only ``full`` did."""
    named = list(body.modules())
    in_units = {id(m) for u in units for top in u.modules for m in top.modules()}
    last = max((i for i, m in enumerate(named) if id(m) in in_units), default=len(named))
    after = tuple(m for m in named[last + 1 :] if id(m) not in in_units and any(True for _ in m.parameters(recurse=False)))
    if not after:
        return units
    names = {id(m): n for n, m in body.named_modules()}
    tail = units[-1]
    return [*units[:-1], Unit(",".join([tail.name, *(names[id(m)] for m in after)]), (*tail.modules, *after))]


def _timm_blocks(body: nn.Module) -> list[Unit]:
    from timm.models import group_modules

    if not hasattr(body, "group_matcher"):  # a few timm models (MetaFormer: PoolFormer, ...) declare none
        return _generic_blocks(body)
    groups = group_modules(body, body.group_matcher(coarse=False))
    units = []
    for names in groups.values():
        modules = tuple(body.get_submodule(n) for n in names)
        if any(_has_params(m) for m in modules):
            owners = dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names)
            units.append(Unit(",".join(owners), modules))
    return units


def blocks(backbone: Backbone) -> list[Unit]:
    body = backbone.body
    return _timm_blocks(body) if backbone.source == "timm" else _torchvision_blocks(body)


class _Tracer(fx.Tracer):
    """FX tracer that keeps timm's untraceable modules (e.g. 'same' padding) as leaves.

    Stochastic depth is a leaf too: traced through, its ``if self.training`` would be frozen into
    the graph, and a graph reused for training and evaluation must leave that choice to run time.
    """

    def __init__(self, source: str):
        leaves, functions = (torchvision.ops.StochasticDepth,), ()
        if source == "timm":
            from timm.layers import DropPath, get_notrace_functions, get_notrace_modules

            leaves, functions = (*leaves, DropPath, *get_notrace_modules()), tuple(get_notrace_functions())
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


def _spatial(node: fx.Node) -> bool:
    """True while the op still sees a grid (N,C,H,W or N,H,W,C with H*W > 1) or a token sequence (N,L,D with L > 1).

    A 4-d tensor is a grid read either way: ConvNeXt's pooled (N,C,1,1) is permuted to (N,1,1,C) for its last norm.
    """
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None or len(shape) < 3:
        return False
    return shape[1] > 1 if len(shape) == 3 else math.prod(shape[2:]) > 1 and math.prod(shape[1:3]) > 1


@contextmanager
def _in_eval_mode(body: nn.Module):
    """Eval mode for tracing or a dry run; each module's own mode back after it, even if it fails.

    Each module's, not ``body.train(mode)``: that would put the frozen BatchNorm layers that
    ``TransferModule.train`` keeps in eval mode back in train mode (a model traced mid-fit).
    """
    modes = [(m, m.training) for m in body.modules()]
    try:
        yield body.eval()
    finally:
        for module, mode in modes:
            module.training = mode


def trace(backbone: Backbone) -> fx.Graph:
    """The body's graph, traced in eval mode (leaves decide train/eval behaviour at run time)."""
    with _in_eval_mode(backbone.body) as body:
        return _Tracer(backbone.source).trace(body)


def layers(backbone: Backbone) -> list[Unit]:
    """The body's traced ops in execution order, up to the last op before global pooling."""
    body = backbone.body
    graph = trace(backbone)
    module = fx.GraphModule(body, graph)
    size = backbone.preprocessing.crop_size
    weight = next(body.parameters())  # the body's device and dtype: it may be on a GPU already (library use)
    with _in_eval_mode(module), torch.no_grad():
        ShapeProp(module).propagate(torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype))
    ops = [n for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    last_spatial = max(i for i, n in enumerate(ops) if _spatial(n))
    weights = dict(body.named_parameters(remove_duplicate=False))
    units = []
    for node in ops[: last_spatial + 1]:
        if node.op == "call_module":
            units.append(Unit(str(node.target), (body.get_submodule(node.target),)))
        else:
            read = (weights[n.target] for n in node.all_input_nodes if n.op == "get_attr" and n.target in weights)
            units.append(Unit(node.name, (), tuple(read)))
    return units


def modules_to_unfreeze(backbone: Backbone, strategy: Strategy) -> list[Unit]:
    """Phase B's trainable units for ``strategy``; a clear error when N exceeds what exists."""
    if strategy.kind == "frozen":
        return []
    if strategy.kind == "full":
        return [Unit("backbone", (backbone.body,))]
    units = blocks(backbone) if strategy.kind == "blocks" else layers(backbone)
    if strategy.n > len(units):
        raise TlexpError(
            f"strategy {strategy.name}: {backbone.name} has only {len(units)} {strategy.kind}; "
            f"use {strategy.kind}_N with N <= {len(units)}, or strategy=full"
        )
    return units[-strategy.n :]
