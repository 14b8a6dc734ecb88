"""Speed: the fast defaults chosen per device, FLOPs, timing and inference runtimes."""
