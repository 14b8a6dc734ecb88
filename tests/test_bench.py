"""make bench's driver on tiny data: both perf modes run, and the report holds ratios and the machine."""

from __future__ import annotations

import json

from scripts import bench


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
    assert set(case) == {"naive", "fast", "ratio", "onnx", "measured", "command"} and "--cases resnet50_frozen" in case["command"]
    assert case["onnx"]["torch"] > 0 and case["onnx"]["onnxruntime"] > 0
    assert case["ratio"]["wall"] > 0 and case["naive"]["peak_rss_mib"] > 100
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    text = (report / "bench.md").read_text()
    assert "| resnet50_frozen | naive |" in text and "naive / fast" in text and "ONNX Runtime" in text


def test_bench_keeps_the_cases_it_did_not_rerun(tmp_path, monkeypatch):
    report = tmp_path / "docs"
    report.mkdir()
    fake = {"wall_s": 1.0, "phase_a_s": 1.0, "phase_b_epoch_s": 2.0, "phase_b_steady_epoch_s": 0.5,
            "train_images_per_s": 1.0, "peak_rss_mib": 1.0, "test_acc": 0.5, "ms_per_image": 1.0}
    old = {"naive": fake, "fast": fake, "ratio": {"wall": 2.0, "phase_b_epoch": None, "test_acc_points": 0.0}}
    (report / "bench.json").write_text(json.dumps({"command": "python -m tlexp.bench old", "cases": {"lite0_frozen": old}}))
    monkeypatch.setattr(bench, "run_case", lambda *a: dict(fake))
    bench.main(["--cases", "resnet50_blocks_2", "--no-onnx", "--report", str(report), "--out", str(tmp_path / "out")])
    cases = json.loads((report / "bench.json").read_text())["cases"]
    assert cases["lite0_frozen"]["command"] == "python -m tlexp.bench old"
    assert cases["resnet50_blocks_2"]["ratio"]["phase_b_steady_epoch"] == 4.0
    assert "python -m tlexp.bench old" in (report / "bench.md").read_text()


def test_gpu_bench_report_has_rows_ratio_and_machine(tmp_path):
    """scripts/bench_gpu.py's report (the sweeps themselves need a GPU: make bench-gpu)."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    row = {"fit_and_test_s": 10.0, "phase_a_s": 2.0, "phase_b_s": 7.0, "train_images_per_s": 900.0, "peak_gpu_memory_mib": 1500.0,
           "test_acc": 0.9, "ms_per_image": 1.5, "runtime": "cudagraph", "precision": "32-true"}
    split = {"job_start_s": 4.25, "before_fit_s": 3.0, "fit_s": 9.0, "decoded_views_s": 2.5, "prefix_outputs_s": 1.0,
             "waiting_for_other_jobs_s": 0.5, "test_s": 0.5, "speed_s": 2.0, "speed_cpu_s": 1.5}
    naive_split = {"job_start_s": 1.0, "before_fit_s": 2.0, "fit_s": 30.0, "test_s": 1.0, "speed_s": 2.0}
    results = {"naive": {"wall_s": 600.0, "mean_test_acc": 0.93, "rows": {"frozen": row | {"time_split": naive_split}}},
               "fast": {"wall_s": 100.0, "mean_test_acc": 0.925, "rows": {"frozen": row | {"time_split": split}}}}
    info = {"gpu": "NVIDIA H100", "cpu_cores": 16, "torch": "2.11", "cuda": "13.0", "python": "3.12"}
    bench_gpu.write_report(tmp_path, results, info, "python scripts/bench_gpu.py --root x")
    text = (tmp_path / "bench_gpu.md").read_text()
    assert "**6.00x**" in text and "(-0.50 points)" in text and "NVIDIA H100" in text
    assert "| frozen | naive | 1 | 10.0 | 2.0 | 7.0 | 900 | 1,500 | 90.00 % | 1.50 | cudagraph | 32-true |" in text
    assert "| frozen | fast | 4.2 | 3.0 | 9.0 | 2.5 | 1.0 | 0.5 | 0.5 | 2.0 | 1.5 |" in text
    assert "| frozen | naive | 1.0 | 2.0 | 30.0 | – | – | – | 1.0 | 2.0 | – |" in text  # no cache: nothing of its own
    del results["naive"]  # written after each sweep: the fast sweep alone has no ratio yet
    bench_gpu.write_report(tmp_path, results, info, "python scripts/bench_gpu.py --root x")
    assert "perf=naive not run: no ratio" in (tmp_path / "bench_gpu.md").read_text()
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["results"]["fast"]["wall_s"] == 100.0
