"""What people read: per-phase and end-of-run summaries, tlexp-table and its plots, the best trial."""
