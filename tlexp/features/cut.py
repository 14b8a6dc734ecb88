"""Cut a backbone's traced graph into the frozen prefix and the part that learns.

Every op that neither holds a trainable parameter nor depends on one computes the same value for the
same input in every epoch: that is the prefix, whose outputs can be cached. The suffix is the rest
of the graph; it takes the prefix values it reads (one tensor at a block boundary, two inside a
residual block) and shares its modules, hence its parameters, with the backbone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx, nn

from tlexp.model.backbones import Backbone
from tlexp.model.strategies import trace


@dataclass
class PrefixCut:
    prefix: fx.GraphModule  # image -> tuple of cut values
    suffix: fx.GraphModule  # *cut values -> pooled features
    boundary: tuple[str, ...]  # names of the values that cross the cut


class NoFrozenPrefix(Exception):
    """The frozen prefix is empty (e.g. strategy=full) or the backbone does not trace."""


def cut_frozen_prefix(backbone: Backbone, trainable: Iterable[nn.Parameter]) -> PrefixCut:
    """Cut ``backbone.body`` after its last op that does not depend on a parameter in ``trainable``."""
    body = backbone.body
    try:
        graph = trace(backbone)
    except Exception as exc:  # tracing is best effort: callers fall back to images
        raise NoFrozenPrefix(f"{backbone.name} does not trace with torch.fx ({type(exc).__name__}: {exc})") from exc
    learning = {id(p) for p in trainable}
    dynamic: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        owns_trainable = (
            node.op == "call_module" and any(id(p) in learning for p in body.get_submodule(node.target).parameters())
        ) or (node.op == "get_attr" and id(_attr(body, node.target)) in learning)
        if owns_trainable or any(n in dynamic for n in node.all_input_nodes):
            dynamic.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    readers = [n for n in graph.nodes if n in dynamic] + [output]
    cut = list(dict.fromkeys(i for n in readers for i in n.all_input_nodes if i not in dynamic))
    if any(n.op == "placeholder" for n in cut):
        raise NoFrozenPrefix("the trainable part starts at the input image: nothing is frozen in front of it")

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "output" and node not in dynamic:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in cut))

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {n: suffix_graph.placeholder(n.name) for n in cut}
    for node in graph.nodes:
        if node in dynamic or node.op == "output":
            senv[node] = suffix_graph.node_copy(node, lambda n: senv[n])
    prefix, suffix = fx.GraphModule(body, prefix_graph), fx.GraphModule(body, suffix_graph)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()
    return PrefixCut(prefix=prefix, suffix=suffix, boundary=tuple(n.name for n in cut))


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
