"""run_summary: medians after the warm-up lines, the largest peak memory, clear errors."""
import json

import pytest

from megatron_style.cli.run_summary import main, summarize


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"step": 5, "time/step_s": 9.0, "perf/mfu": 0.01, "memory/peak_gib": 70.0},
        {"step": 10, "time/step_s": 1.0, "perf/mfu": 0.40, "memory/peak_gib": 40.0},
        {"step": 15, "time/step_s": 1.2, "perf/mfu": 0.30, "memory/peak_gib": 41.0},
        {"step": 20, "time/step_s": 1.1, "perf/mfu": 0.35, "memory/peak_gib": 42.5}]


def test_medians_after_the_skipped_lines():
    s = summarize(ROWS, skip=5)
    assert s["time/step_s"] == pytest.approx(1.1)
    assert s["perf/mfu"] == pytest.approx(0.35)
    assert s["memory/peak_gib"] == 42.5  # the first interval's 70 is start-up and skipped
    assert s["steps"] == 3 and "throughput/samples_per_s" not in s


def test_table_and_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", ROWS)
    assert main([a, a, "--skip", "5", "--names", "triton,reference"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | logged intervals | step s")
    assert out[2].startswith("| triton | 3 | 1.100 |") and "35.0%" in out[2] and "| 42.5 |" in out[2]
    assert main([a, "--skip", "20"]) == 2
    assert "no logged step after --skip 20 (the last logged step is 20)" in capsys.readouterr().err
    assert main([a, "--names", "x,y"]) == 2
