"""``callbacks=ema``: an exponential moving average of the weights is what a run validates, keeps and tests.

Lightning's ``WeightAveraging`` does the work (the average is swapped in for validation and written
as the checkpoint's ``state_dict``; the training weights ride along for resuming). Two changes from
its ``EMAWeightAveraging``:

- the average is a lerp (``get_ema_multi_avg_fn``), which leaves a frozen tensor bit-identical, where
  ``decay * avg + (1 - decay) * w`` rounds it a little at every step: frozen layers stay the
  pretrained ones, and the frozen-prefix cache stays exact;
- outside fitting (``trainer.test(ckpt_path=best)``, prediction) a checkpoint is loaded as saved:
  Lightning's hook would put the training weights back, so the test would score another model than
  the one validation picked and ``tlexp-predict`` serves.
"""

from __future__ import annotations

from pytorch_lightning.callbacks.weight_averaging import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEMA(WeightAveraging):
    """EMA of every parameter and buffer (BatchNorm statistics too), updated after each optimizer step."""

    def __init__(self, decay: float = 0.999):
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
