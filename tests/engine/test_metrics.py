"""The training log: plain lines when the output is not a terminal (no progress-bar carriage returns)."""

from __future__ import annotations

import json

from xtuner_vl.engine.metrics import MetricsLogger

METRICS = {"loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "samples_per_s": 1.0, "peak_mem_gib": 1.0}


def test_redirected_output_gets_plain_lines_and_every_step_goes_to_the_jsonl(tmp_path, capfd):
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=0, enabled=True, tensorboard=False)
    for step in range(1, 5):
        logger.log(step, METRICS, console=step % 2 == 0)
    logger.message("checkpoint: somewhere")
    logger.close()
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # pytest's output is not a terminal: no bar updates
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["2/4", "4/4"]
    assert "checkpoint: somewhere" in out
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
