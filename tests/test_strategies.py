"""Strategy definitions: the reference study's trainable-parameter counts (docs/architecture.md, Strategies), block and layer selection, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

from tlexp.errors import TlexpError
from tlexp.model.backbones import build_backbone
from tlexp.model.finetune import phase_b_params
from tlexp.model.module import make_head
from tlexp.model.strategies import blocks, layers, modules_to_unfreeze, parse_strategy

# The reference study's counts under these definitions (docs/architecture.md, Strategies): torchvision ResNet-50 with a 5-class head.
RESNET50_COUNTS = {
    "frozen": 10_245,
    "layers_5": 1_062_917,
    "layers_10": 4_472_837,
    "layers_40": 15_829_509,
    "blocks_2": 8_935_429,
    "blocks_4": 16_092_165,
    "blocks_10": 22_353_413,
}


# The study's MobileNet (V1; Keras counts BatchNorm's gamma and beta, not its moving statistics).
MOBILENET_V1_COUNTS = {
    "frozen": 5_125,
    "layers_5": 1_057_797,
    "layers_10": 1_593_349,
    "layers_40": 2_937_349,
    "blocks_2": 1_598_981,
    "blocks_4": 2_136_581,
    "blocks_10": 3_181_445,
}


@pytest.fixture(scope="module")
def resnet50():
    return build_backbone("torchvision", "resnet50", None)


@pytest.fixture(scope="module")
def mobilenet_v1():
    return build_backbone("timm", "mobilenetv1_100", None)


@pytest.mark.parametrize("name,expected", RESNET50_COUNTS.items())
def test_resnet50_trainable_counts_match_design(resnet50, name, expected):
    head = make_head(resnet50.feature_dim, 5, hidden_dim=None, dropout=0.2)
    units = modules_to_unfreeze(resnet50, parse_strategy(name))
    assert phase_b_params(head, units) == expected


@pytest.mark.parametrize("name,expected", MOBILENET_V1_COUNTS.items())
def test_mobilenet_v1_trainable_counts_within_half_a_percent_of_the_study(mobilenet_v1, name, expected):
    """Issue 17: model=mobilenet_v1 (timm mobilenetv1_100) is the study's second model (layers_5: -0.19 %, the rest exact)."""
    backbone = mobilenet_v1
    head = make_head(backbone.feature_dim, 5, hidden_dim=None, dropout=0.2)
    assert phase_b_params(head, modules_to_unfreeze(backbone, parse_strategy(name))) == pytest.approx(expected, rel=0.005)


def test_full_is_every_backbone_parameter(resnet50):
    head = make_head(resnet50.feature_dim, 5, None, 0.0)
    total = sum(p.numel() for p in resnet50.body.parameters()) + sum(p.numel() for p in head.parameters())
    assert phase_b_params(head, modules_to_unfreeze(resnet50, parse_strategy("full"))) == total


@pytest.mark.parametrize(
    "source,name,n_blocks",
    [("torchvision", "resnet50", 16), ("torchvision", "mobilenet_v2", 19), ("torchvision", "vgg16", 5),
     ("torchvision", "efficientnet_b0", 18), ("timm", "tf_efficientnet_lite0", 17),
     ("torchvision", "regnet_y_400mf", 16)],  # its residual blocks (was 5: the stem and four whole stages)
)
def test_block_counts(source, name, n_blocks):
    assert len(blocks(build_backbone(source, name, None))) == n_blocks


@pytest.mark.parametrize("name,last", [("googlenet", ["inception5a", "inception5b"]), ("inception_v3", ["Mixed_7b", "Mixed_7c"])])
def test_auxiliary_classifiers_are_not_blocks_and_training_gives_features(name, last):
    """Their auxiliary classifiers, registered after (GoogLeNet) or among (Inception) the last blocks, were
    blocks_2's units, and in train mode the body returned (logits, aux), which the head could not take."""
    backbone = build_backbone("torchvision", name, None)
    assert [u.name for u in blocks(backbone)][-2:] == last
    assert backbone.body.train()(torch.zeros(2, 3, 299, 299)).shape == (2, backbone.feature_dim)


@pytest.mark.parametrize("name,last", [
    ("densenet121", ["features.denseblock3,features.transition3", "features.denseblock4,features.norm5"]),
    ("maxvit_t", ["blocks.2", "blocks.3,classifier.2,classifier.3"]),
])
def test_blocks_of_densenet_and_maxvit_are_their_blocks(name, last):
    """Their last 'blocks' were the layers after the last block: DenseNet's norm5, MaxViT's pre-logits
    LayerNorm and Linear (blocks_2 trained those two alone)."""
    units = blocks(build_backbone("torchvision", name, None))
    assert [u.name for u in units][-2:] == last and len(units) == 4


def test_layers_follow_execution_order_up_to_pooling(resnet50):
    ops = layers(resnet50)
    assert [u.name for u in ops[-10:]] == [
        "layer4.2.conv1", "layer4.2.bn1", "layer4.2.relu", "layer4.2.conv2", "layer4.2.bn2",
        "layer4.2.relu", "layer4.2.conv3", "layer4.2.bn3", "add_15", "layer4.2.relu",
    ]
    assert ops[0].name == "conv1"


def test_mobilenet_v2_layer_count_is_keras_body():
    # 153 traced ops in all; the body stops before adaptive_avg_pool2d, flatten, dropout, linear.
    assert len(layers(build_backbone("torchvision", "mobilenet_v2", None))) == 149


def test_every_layer_is_the_whole_backbone_when_functions_read_weights():
    """Swin's attention takes its projection weights and position-bias table as function arguments: layers_N
    left them out, so even every layer (170) trained 18.9M of Swin-T's 27.5M parameters."""
    swin = build_backbone("torchvision", "swin_t", None)
    head = make_head(swin.feature_dim, 5, None, 0.0)
    every = modules_to_unfreeze(swin, parse_strategy(f"layers_{len(layers(swin))}"))
    assert phase_b_params(head, every) == phase_b_params(head, modules_to_unfreeze(swin, parse_strategy("full"))) == 27_523_199


def test_larger_n_is_monotone(resnet50):
    head = make_head(resnet50.feature_dim, 5, None, 0.0)
    counts = [phase_b_params(head, modules_to_unfreeze(resnet50, parse_strategy(f"layers_{n}"))) for n in (1, 5, 20, 80, 172)]
    assert counts == sorted(counts)


@pytest.mark.parametrize("bad", ["blocks_0", "layer_5", "freeze", "blocks_x", ""])
def test_unknown_strategy_names(bad):
    with pytest.raises(TlexpError, match="unknown strategy"):
        parse_strategy(bad)


def test_n_larger_than_backbone_is_a_clear_error(resnet50):
    with pytest.raises(TlexpError, match="only 16 blocks"):
        modules_to_unfreeze(resnet50, parse_strategy("blocks_17"))
    with pytest.raises(TlexpError, match="only 172 layers"):
        modules_to_unfreeze(resnet50, parse_strategy("layers_500"))


def test_counting_layers_leaves_every_module_in_its_mode_even_when_it_fails(monkeypatch):
    backbone = build_backbone("torchvision", "resnet18", None)
    body = backbone.body.train()
    body.bn1.eval()  # a frozen BatchNorm, which TransferModule.train keeps in eval mode
    layers(backbone)
    assert body.training and body.layer1[0].bn1.training and not body.bn1.training

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ShapeProp, "propagate", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        layers(backbone)
    assert body.training and body.layer1[0].bn1.training and not body.bn1.training


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "ghostnet_100"])
def test_timm_feature_dim_is_what_the_body_returns(name):
    """A layer after pooling (conv_head) makes the body's output wider than num_features: the head got 576
    inputs for 1024 features and the first batch failed in a matmul."""
    backbone = build_backbone("timm", name, None)
    assert backbone.body.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, backbone.feature_dim)


def test_timm_model_without_group_matcher_has_blocks():
    """PoolFormer (timm's MetaFormer) declares no group_matcher: blocks_N failed with an AttributeError."""
    units = blocks(build_backbone("timm", "poolformer_s12", None))
    assert [u.name for u in units] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3,head.norm"]


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_convolutional_classifier_is_replaced(name):
    """SqueezeNet classifies with a 1x1 conv, no Linear: build_backbone refused it ("no Linear classifier")."""
    backbone = build_backbone("torchvision", name, None)
    assert backbone.feature_dim == 512
    assert backbone.body.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    assert len(layers(backbone)) > 0 and len(blocks(backbone)) == 9


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}, "epoch": 3},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
])
def test_local_weights_from_checkpoints_prefixes_and_other_heads(tmp_path, wrap):
    """A Lightning/tlexp checkpoint (keys under backbone.), a DDP state dict (module.), a fine-tuned model with
    10 classes: each refused as "does not fit", though the classifier they lack or differ in is replaced anyway."""
    source = torchvision.models.resnet18()
    torch.save(wrap(source.state_dict()), tmp_path / "w.ckpt")
    body = build_backbone("torchvision", "resnet18", str(tmp_path / "w.ckpt")).body
    assert torch.equal(body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_local_weights_of_another_architecture_say_what_to_give(tmp_path):
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "w.pth")
    with pytest.raises(TlexpError, match=r"does not fit ResNet: 120 of its 122 tensors missing \(bn1.bias, .*Give a state dict saved"):
        build_backbone("torchvision", "resnet18", str(tmp_path / "w.pth"))


def test_timm_name_with_a_pretrained_tag_is_a_model():
    """timm names its hub weights architecture.tag (resnet18.a1_in1k): the tag was refused as an unknown model."""
    assert build_backbone("timm", "resnet18.a1_in1k", None).feature_dim == 512
    with pytest.raises(TlexpError, match="unknown timm model 'resnet18.nosuchtag'. Did you mean: resnet18"):
        build_backbone("timm", "resnet18.nosuchtag", None)


@pytest.mark.parametrize("name,last", [
    ("mnasnet0_5", ["layers.13.0", "layers.14,layers.15"]),
    ("shufflenet_v2_x0_5", ["stage4.3", "conv5.0,conv5.1"]),
    ("convnext_tiny", ["features.2.0,features.2.1", "features.3.0"]),
])
def test_a_bare_norm_layer_is_no_block_of_its_own(name, last):
    """MnasNet's and ShuffleNet's closing conv and BatchNorm sit in plain Sequentials: blocks_1 trained the
    BatchNorm alone, blocks_2 the conv and its BatchNorm; ConvNeXt's downsampling LayerNorm was a block too."""
    names = [u.name for u in blocks(build_backbone("torchvision", name, None))]
    start = names.index(last[0])
    assert names[start : start + 2] == last


@pytest.mark.parametrize("name,last", [
    ("vit_b_32", "encoder.layers.encoder_layer_11,encoder.ln"), ("swin_t", "features.7.1,norm"),
    ("convnext_tiny", "features.7.2,classifier.0"),
])
def test_the_norm_after_the_last_block_trains_with_it(name, last):
    """The final norm before pooling was in no block: no blocks_N trained it (timm's own ViT groups it with the last block)."""
    assert blocks(build_backbone("torchvision", name, None))[-1].name == last


@pytest.mark.parametrize("name,last,kept", [
    ("mobilenet_v3_large", "features.16,classifier.0", 960 * 1280 + 1280),
    ("alexnet", "features.10,classifier.1,classifier.4", 9216 * 4096 + 4096 + 4096 * 4096 + 4096),
    ("vgg11", "features.stage5,classifier.0,classifier.3", 25088 * 4096 + 4096 + 4096 * 4096 + 4096),
])
def test_the_layers_a_classifier_keeps_train_with_the_last_block(name, last, kept):
    """The Linear layers before the replaced one (MobileNetV3's 960-to-1280, AlexNet's and VGG's fc6/fc7) sit nearest
    the head but were in no block: frozen under every blocks_N, trained only by full (timm groups its MobileNetV3's
    conv_head with the last block)."""
    backbone = build_backbone("torchvision", name, None)
    tail, classifier = blocks(backbone)[-1], list(backbone.body.classifier.parameters())
    assert tail.name == last and {id(p) for p in classifier} <= {id(p) for p in tail.parameters()}
    assert sum(p.numel() for p in classifier) == kept  # the replaced Linear is no part of it


def test_a_file_that_is_no_state_dict_is_one_clear_message(tmp_path):
    """A pickled list went through as TypeError ("Expected state_dict to be dict-like")."""
    torch.save([1, 2], tmp_path / "w.pth")
    with pytest.raises(TlexpError, match="does not fit ResNet: the file holds a list, not a state dict"):
        build_backbone("torchvision", "resnet18", str(tmp_path / "w.pth"))


def test_the_removed_classifier_is_no_layer():
    """SqueezeNet's classifier conv and Dropout sit before its pooling: replaced by Identity they were counted as
    its last layers, so layers_N unfroze N - 2 real ones."""
    squeezenet = build_backbone("torchvision", "squeezenet1_1", None)
    assert [u.name for u in layers(squeezenet)[-3:]] == ["features.12.expand3x3_activation", "cat_7", "classifier.2"]
    assert len(layers(build_backbone("torchvision", "mobilenet_v2", None))) == 149


@pytest.mark.parametrize("name,weights_enum", [("googlenet", "GoogLeNet_Weights"), ("inception_v3", "Inception_V3_Weights")])
def test_auxiliary_classifiers_go_with_pretrained_weights_and_weights_files(tmp_path, monkeypatch, name, weights_enum):
    """torchvision refuses aux_logits=False with weights ("expected value True"): pretrained GoogLeNet and
    Inception-v3 failed to build, and a state dict saved with the auxiliary heads "did not fit"."""
    with_aux = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=False)
    monkeypatch.setattr(getattr(torchvision.models, weights_enum), "get_state_dict", lambda self, **kw: with_aux.state_dict())
    torch.save(with_aux.state_dict(), tmp_path / "w.pth")
    for weights in ("DEFAULT", str(tmp_path / "w.pth")):
        backbone = build_backbone("torchvision", name, weights)
        assert not any(n.lower().startswith("aux") for n, _ in backbone.body.named_children())
        assert backbone.body.train()(torch.zeros(2, 3, 299, 299)).shape == (2, backbone.feature_dim)


def test_a_safetensors_file_loads(tmp_path, monkeypatch):
    """The hub's weights format: model.weights=w.safetensors was read as a weights enum name ("not a weights
    name of resnet18"); safetensors reads it on every torch tlexp supports (torch.load only on recent ones)."""
    from safetensors.torch import save_file

    source = torchvision.models.resnet18()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    body = build_backbone("torchvision", "resnet18", "w.safetensors").body
    assert torch.equal(body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(TlexpError, match="bad.safetensors is not a PyTorch weights file"):
        build_backbone("torchvision", "resnet18", "bad.safetensors")


@pytest.mark.parametrize("source,name,hint", [
    ("torchvision", "tf_efficientnet_lite0", "It is a timm model: model=timm model.name=tf_efficientnet_lite0"),
    ("timm", "regnet_y_400mf", "It is a torchvision model: model.source=torchvision model.name=regnet_y_400mf"),
    ("torchvision", "zzzz", "torchvision.models.list_models(module=torchvision.models) lists the names"),
])
def test_an_unknown_name_says_what_to_do(source, name, hint):
    """A name of the other source got close names of this one (efficientnet_b0 for tf_efficientnet_lite0), a
    name like none nothing at all."""
    with pytest.raises(TlexpError, match=f"unknown .*'{name}'. {re.escape(hint)}$"):
        build_backbone(source, name, None)
