"""What a job shows between evaluations: a bar on a terminal, else one plain line per report."""

import logging

import pytest

from contrastive.progress import Progress, format_duration


def test_a_line_per_report_when_stdout_is_not_a_terminal(caplog):
    progress = Progress(
        start_step=0, total_steps=100, world_size=2, flops_per_sample=1e9, peak_flops=1e12, terminal=False
    )
    assert progress.bar is None
    with caplog.at_level(logging.INFO, logger="contrastive.train"):
        for step in range(1, 11):
            progress.step(step, samples=8, seconds=0.1, data_seconds=0.02)
        figures = progress.report(
            10, {"loss": 3.0, "loss/image-text": 1.5, "loss/audio-text": 1.5, "lr": 1e-3, "epoch": 1}
        )
    assert figures["samples_per_s"] == pytest.approx(8 * 2 / 0.1)  # every rank's samples
    assert figures["mfu"] == pytest.approx(1e9 * 160 / 2e12) and figures["data_wait_frac"] == pytest.approx(0.2)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(
        "step 10/100 (10%) | epoch 1 | loss 3.000 (image-text 1.500, audio-text 1.500) | "
        "lr 1.00e-03 | 160 samples/s | data wait 20% | MFU 8.0% | ETA "
    )
    assert progress.figures()["samples_per_s"] == 0  # a new window


def test_a_bar_and_no_lines_on_a_terminal(caplog):
    progress = Progress(start_step=5, total_steps=10, world_size=1, terminal=True)
    with caplog.at_level(logging.INFO, logger="contrastive.train"):
        progress.step(6, samples=4, seconds=0.1, data_seconds=0.0)
        progress.report(6, {"loss": 1.0, "lr": 1e-3})
    progress.close()
    assert progress.bar is not None and progress.bar.n == 6 and not caplog.records
    assert Progress(start_step=0, total_steps=1, world_size=1, terminal=True, enabled=False).bar is None


def test_durations_read_as_a_clock():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
