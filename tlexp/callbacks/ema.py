"""``callbacks=ema``: an exponential moving average of the weights is what a run validates, keeps and tests.

Lightning's ``WeightAveraging`` does the work (the average is swapped in for validation and written
as the checkpoint's ``state_dict``; the training weights ride along for resuming). Three changes from
its ``EMAWeightAveraging``:

- the average is a lerp (``get_ema_multi_avg_fn``), which leaves a frozen tensor bit-identical, where
  ``decay * avg + (1 - decay) * w`` rounds it a little at every step: frozen layers stay the
  pretrained ones, and the frozen-prefix cache stays exact;
- the average is float32 also under ``trainer.precision=bf16-true`` / ``16-true`` (the copy Lightning makes
  before the weights are cast), each step's weights cast to it: a bf16 average would not move, as decay
  0.999 moves it by a thousandth of its distance to the weights, under bf16's resolution of 1/256; for
  validation the training weights are kept aside rather than swapped into the average, which would round
  it to their dtype at every validation;
- outside fitting (``trainer.test(ckpt_path=best)``, prediction) a checkpoint is loaded as saved:
  Lightning's hook would put the training weights back, so the test would score another model than
  the one validation picked and ``tlexp-predict`` serves.
"""

from __future__ import annotations

import itertools

import torch
from pytorch_lightning.callbacks.weight_averaging import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEMA(WeightAveraging):
    """EMA of every parameter and buffer (BatchNorm statistics too), updated after each optimizer step."""

    def __init__(self, decay: float = 0.999):
        super().__init__(use_buffers=True, multi_avg_fn=_ema_in_average_dtype(decay))
        self._training_weights: list[torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._average_model is not None:
            self._training_weights = [t.detach().clone() for t in _tensors(pl_module)]
            self._copy_average_to_current(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._training_weights is not None:
            for kept, tensor in zip(self._training_weights, _tensors(pl_module)):
                tensor.data.copy_(kept)
            self._training_weights = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def _tensors(module: torch.nn.Module):
    """What the average holds, in its order: parameters, then buffers."""
    return itertools.chain(module.parameters(), module.buffers())


def _ema_in_average_dtype(decay: float):
    """``get_ema_multi_avg_fn`` on the weights cast to the average's dtype (float32 under bf16-true / 16-true)."""
    ema = get_ema_multi_avg_fn(decay)

    def update(averages: list[torch.Tensor], weights: list[torch.Tensor], n_averaged) -> None:
        ema(averages, [w.to(a.dtype) for a, w in zip(averages, weights)], n_averaged)

    return update
