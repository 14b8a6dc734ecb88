"""Focal loss and class weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tlexp.errors import TlexpError
from tlexp.model.losses import FocalLoss, batch_weight, build_loss, class_weights
from tlexp.model.module import TransferModule, epoch_mean


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])  # an easy and a hard example of class 0
    target = torch.tensor([0, 0])
    per_example_ce = F.cross_entropy(logits, target, reduction="none")
    p_t = torch.exp(-per_example_ce)
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert torch.allclose(FocalLoss(gamma=2.0)(logits, target), expected)
    assert FocalLoss(gamma=2.0)(logits[:1], target[:1]) < 0.01 * F.cross_entropy(logits[:1], target[:1])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradient_is_finite_when_an_example_is_certain(gamma):
    """With 0 < gamma < 1 a confident example (p_t rounds to 1) made the whole batch's gradient nan."""
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    FocalLoss(gamma)(logits, torch.tensor([0, 2])).backward()
    hard = logits[1:].detach().requires_grad_()
    FocalLoss(gamma)(hard, torch.tensor([2])).backward()
    assert logits.grad[0].abs().max() < 1e-12 and torch.allclose(logits.grad[1], hard.grad[0] / 2)


def test_alpha_weights_each_class():
    logits, target = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    alpha = torch.tensor([0.25, 0.75])
    log_p_t = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    unweighted = -((1 - log_p_t.exp()) ** 2) * log_p_t
    assert torch.allclose(FocalLoss(2.0, alpha)(logits, target), (unweighted * alpha[target]).mean())


def test_auto_weights_are_inverse_frequency():
    assert torch.allclose(class_weights("auto", [30, 10], "x"), torch.tensor([40 / 60, 40 / 20]))
    assert class_weights(None, [1, 2], "x") is None
    for bad in ([1.0], "Auto", [1, "x"], 3, [1.0, float("nan")], [0, 0], [-1, 2]):  # was a ValueError traceback for a word
        with pytest.raises(TlexpError, match=r"=.*: give auto, null or 2 non-negative numbers \(one per class, not all 0\)"):
            class_weights(bad, [3, 4], "loss.alpha")
    assert torch.equal(class_weights([0, 2], [3, 4], "x"), torch.tensor([0.0, 2.0]))  # a class left out of the loss


def test_build_loss_from_config():
    ce = build_loss({"name": "ce", "label_smoothing": 0.1, "class_weights": "auto"}, [10, 30])
    assert ce.label_smoothing == 0.1 and torch.allclose(ce.weight, torch.tensor([2.0, 2 / 3]))
    focal = build_loss({"name": "focal", "gamma": 1.5, "alpha": None}, [1, 1])
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5
    with pytest.raises(TlexpError, match="unknown loss"):
        build_loss({"name": "hinge"}, [1, 1])


def test_weighted_cross_entropy_of_a_batch_of_zero_weight_classes_is_zero_not_nan():
    """Class weight 0 leaves a class out of the loss; a batch of that class alone (a last batch of one image) was
    torch's 0 / 0 = nan, whose gradient turned every weight nan at the optimizer step."""
    for smoothing in (0.0, 0.1):
        ce = build_loss({"name": "ce", "label_smoothing": smoothing, "class_weights": [0, 2]}, [3, 4])
        logits = torch.randn(2, 2, requires_grad=True)
        loss = ce(logits, torch.tensor([0, 0]))
        loss.backward()
        assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros(2, 2))
        mixed = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])  # elsewhere the same numbers as torch's weighted mean
        assert torch.equal(ce(*mixed), F.cross_entropy(*mixed, weight=torch.tensor([0.0, 2.0]), label_smoothing=smoothing))


@pytest.mark.parametrize("loss", [{"name": "ce", "label_smoothing": 0.1, "class_weights": [0.5, 2.0, 3.0]},
                                  {"name": "ce", "label_smoothing": 0.0, "class_weights": None},
                                  {"name": "focal", "gamma": 2.0, "alpha": [0.5, 2.0, 3.0]}])
def test_an_epochs_loss_is_the_loss_of_the_whole_epoch_whatever_the_batch_size(loss):
    """Each batch's mean weighs in by what it divides by: with class weights, cross-entropy divides by the targets'
    weights, so weighing by the batch size made val/loss depend on it (batch 1: the unweighted mean)."""
    criterion = build_loss(loss, [6, 2, 2])
    logits, target = torch.randn(10, 3), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    for batch_size in (10, 4, 1):
        epoch = epoch_mean()  # the module's
        for i in range(0, 10, batch_size):
            y = target[i:i + batch_size]
            epoch.update(criterion(logits[i:i + batch_size], y), weight=batch_weight(criterion, y))
        assert torch.allclose(epoch.compute(), criterion(logits, target))


def test_auto_weights_leave_out_a_class_with_no_training_image():
    """A skewed data.split can put all of a small class's images in val/test: its inverse frequency was inf, and
    every val/test loss with one of its images nan."""
    weights = class_weights("auto", [30, 10, 0], "x")
    assert torch.allclose(weights, torch.tensor([40 / 60, 40 / 20, 0.0]))  # mean 1 over the training images, as before
    ce = build_loss({"name": "ce", "label_smoothing": 0.0, "class_weights": "auto"}, [30, 10, 0])
    assert torch.isfinite(ce(torch.randn(3, 3), torch.tensor([0, 1, 2])))


def test_an_epoch_with_a_nan_batch_has_a_nan_loss():
    """A run diverging mid-epoch: torchmetrics' default dropped the nan batches with a warning, so the epoch's
    train/loss was the finite mean of the batches before."""
    module = TransferModule(
        model={"source": "torchvision", "name": "resnet18", "weights": None, "head": {"hidden_dim": None, "dropout": 0.0}},
        class_names=["a", "b"], class_counts=[1, 1], loss={"name": "ce", "label_smoothing": 0.0, "class_weights": None},
        optim={"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0, "scheduler": None}, backbone_lr_factor=0.1,
    ).eval()
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    for batch in (images, images * float("nan")):
        module.training_step((batch, labels), 0)
    assert module.train_loss.compute().isnan()


def test_focal_with_gamma_zero_and_alpha_is_weighted_cross_entropy_times_the_mean_alpha():
    """The normalization FocalLoss's docstring states: per image, as the paper's, not per unit of alpha."""
    logits, target, alpha = torch.randn(16, 4), torch.randint(0, 4, (16,)), torch.tensor([0.5, 1.0, 2.0, 4.0])
    weighted_ce = F.cross_entropy(logits, target, weight=alpha)
    assert torch.allclose(FocalLoss(0.0, alpha)(logits, target), weighted_ce * alpha[target].mean())
