"""Lightning callbacks of a run: epoch history, per-epoch reseeding, test dashboard, LR finder, phase-B early stopping."""
