"""tools/power_draw.py's parsing of nvidia-smi's samples (CPU): timestamps as local unix time, clock and power."""

import datetime

from tests.tool_module import load_tool


def _tool():
    return load_tool("power_draw")


def test_parse_samples_reads_time_clock_and_power():
    text = "2026/11/29 21:52:48.151, 1980, 123.10\n2026/11/29 21:52:48.205, 1714, 692.57\n"
    rows = _tool().parse_samples(text)
    first = datetime.datetime(2026, 11, 29, 21, 52, 48, 151000).timestamp()
    assert len(rows) == 2
    assert abs(rows[0][0] - first) < 1e-6 and abs(rows[1][0] - first - 0.054) < 1e-6
    assert rows[0][1:] == (1980.0, 123.1) and rows[1][1:] == (1714.0, 692.57)
