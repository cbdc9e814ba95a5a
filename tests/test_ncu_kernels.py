"""tools/ncu_kernels.py's reading of an Nsight Compute report (CPU): ncu 2025's `--csv --page details` rows."""

from tests.tool_module import load_tool

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value",')


def _row(launch, kernel, section, name, unit, value):
    return (f'"{launch}","2047","python3.12","127.0.0.1","{kernel}","1","7","(256, 1, 1)","(512, 12, 1)","0","9.0",'
            f'"{section}","{name}","{unit}","{value}",')


REPORT = "\n".join([
    "==PROF== Connected to process 2047 (/usr/bin/python3.12)", HEADER,
    _row(0, "sla_dkdv_kernel", "GPU Speed Of Light Throughput", "Duration", "ns", "1,458,300"),
    _row(0, "sla_dkdv_kernel", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "45.68"),
    _row(0, "sla_dkdv_kernel", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "9.10"),
    _row(0, "sla_dkdv_kernel", "GPU Speed Of Light Throughput", "Elapsed Cycles", "cycle", "2,500,000"),
    _row(0, "sla_dkdv_kernel", "Compute Workload Analysis", "Executed Ipc Active", "inst/cycle", "0.83"),
    _row(1, "sla_dkdv_kernel", "GPU Speed Of Light Throughput", "Duration", "usecond", "1,021.5"),
    _row(2, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "GPU Speed Of Light Throughput", "Duration",
         "msecond", "27.607"),
    "done ['sparse']"])


def _tool():
    return load_tool("ncu_kernels")


def test_parse_report_keeps_launch_order_units_and_the_named_metrics_only():
    kernels = _tool().parse_report(REPORT)
    assert [name for name, _ in kernels] == ["sla_dkdv_kernel", "sla_dkdv_kernel",
                                             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop"]
    assert kernels[0][1] == {"µs": "1458.3", "SM %": "45.68", "DRAM %": "9.10", "IPC": "0.83"}
    assert kernels[1][1] == {"µs": "1021.5"} and kernels[2][1] == {"µs": "27607.0"}


def test_table_has_a_row_per_launch_and_blanks_for_missing_metrics():
    tool = _tool()
    lines = tool.table(tool.parse_report(REPORT), width=20).splitlines()
    assert lines[0] == "| kernel | µs | SM % | DRAM % | L2 % | L1 % | IPC | L2 hit % | occupancy % | waves |"
    assert lines[2] == "| sla_dkdv_kernel | 1458.3 | 45.68 | 9.10 |  |  | 0.83 |  |  |  |"
    assert lines[4].startswith("| cudnn_generated_fort | 27607.0 |") and len(lines) == 5
