"""model.tta=flip: every evaluation (validation, test, predict, export) averages an image with its mirror."""

from __future__ import annotations

import json

import onnxruntime as ort
import torch

from tests.conftest import read_metrics, run_module, train
from tlexp.data.images import load_rgb
from tlexp.data.transforms import eval_transform
from tlexp.predict import load_model


def test_flip_tta_is_the_mean_of_both_views_probabilities_wherever_the_model_is_used(tiny_tree, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "model.tta=flip", "trainer.precision=32")
    assert read_metrics(run)["tta"] == "flip"
    served = load_model(str(run / "checkpoints" / "best.ckpt"))
    module = served.module
    images = torch.stack([eval_transform(served.preprocessing)(load_rgb(p)) for p in sorted(tiny_tree.rglob("*.jpg"))])
    with torch.inference_mode():
        plain, mirrored = module._images_to_logits(images).softmax(1), module._images_to_logits(images.flip(-1)).softmax(1)
        probabilities = module(images).softmax(1)
    torch.testing.assert_close(probabilities, (plain + mirrored) / 2, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the mirror is another view: the average is not the plain output

    result = run_module("tlexp.export", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"out={tmp_path / 'export'}", "speed.repeats=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "export" / "model.json").read_text())["exports"]["onnx"]["max_abs_prob_diff"] < 1e-4
    onnx = ort.InferenceSession(str(tmp_path / "export" / "model.onnx")).run(None, {"image": images.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx).softmax(1), probabilities, atol=1e-4, rtol=0)
