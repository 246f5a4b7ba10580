"""qcorrect demo: thread default, progress lines, the calibrated quantizer's rows (issue 11)."""

import argparse
import io

import pytest
import torch

from qcorrect.bench import common, demo, quantizers


def test_default_threads_honours_omp_and_otherwise_takes_half_the_cpus(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert common.default_threads() == 1  # a busy 2-core box: one thread, not torch's two
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert common.default_threads() == 8


def test_set_threads_keeps_torch_unless_asked(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert common.set_threads(None) == before
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert common.set_threads(None, default=True) == 1
        assert common.set_threads(2) == 2
    finally:
        torch.set_num_threads(before)


def test_progress_prints_one_stamped_line_per_stage():
    out = io.StringIO()
    p = demo.Progress(out)
    p("# euler: FP sampled in 1.0 s")
    p("calibrated W4A8 quantizer")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[demo") and lines[0].endswith("] euler: FP sampled in 1.0 s")


def test_the_demo_prints_the_calibrated_rows_next_to_round_to_nearest(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "DEMO_SEEDS", [2000, 2001])
    monkeypatch.setattr(demo, "DEMO_CALIB_SEEDS", [3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(out=str(tmp_path / "grid.png"), sampler="euler", steps=2, cfg=None, no_correction=True,
                              no_calibrated=False, threads=None)
    assert demo.main(args) == 0
    cap = capsys.readouterr()
    assert "[demo" in cap.err and "calibrated W4A8 quantizer" in cap.err
    assert f"W4A8 calibrated ({quantizers.BEST})" in cap.out and "W4A8 best euler cfg 3: " in cap.out
    assert (tmp_path / "grid.png").stat().st_size > 0
