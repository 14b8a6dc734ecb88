"""make bench's driver on tiny data: both perf modes run, and the report holds ratios and the machine."""

from __future__ import annotations

import json

from tlexp import bench


def test_bench_writes_report_with_ratios(tmp_path, tiny_tree):
    report = tmp_path / "docs"
    report.mkdir()
    bench.main([
        "--cases", "resnet50_frozen", "--root", str(tiny_tree), "--out", str(tmp_path / "out"), "--report", str(report),
        "data=imagefolder", "data.image_size=32", "data.num_workers=0", "data.batch_size=8",
        "trainer.enable_model_summary=false", "profile.warmup=0", "profile.repeats=1",
    ])
    result = json.loads((report / "bench.json").read_text())
    case = result["cases"]["resnet50_frozen"]
    assert set(case) == {"naive", "fast", "ratio", "onnx"}
    assert case["onnx"]["torch"] > 0 and case["onnx"]["onnxruntime"] > 0
    assert case["ratio"]["wall"] > 0 and case["naive"]["peak_rss_mib"] > 100
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    text = (report / "bench.md").read_text()
    assert "| resnet50_frozen | naive |" in text and "naive / fast" in text and "ONNX Runtime" in text
