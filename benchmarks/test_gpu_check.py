"""The device script's CPU dry run (`gpu_check.sh --quick`) must keep working: a device
session is short and rare, so a script that breaks there loses the whole session."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.platform != "linux", reason="the device script is a Linux bash script")
def test_gpu_check_dry_run_passes_and_reports(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "done, status 0" in summary
    # the sanitizer workload ran every case of both kernel generations against its oracles
    log = (tmp_path / "sanitizer.log").read_text()
    assert "failures: 0" in log and "krls v1" in log and "krls v2" in log and "pooling kernels v1" in log
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()


def test_gpu_sanitize_refuses_an_unknown_kernel_generation():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_sanitize.py"), "--quick",
                           "--kernels", "v3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--kernels" in done.stderr and "'v3'" in done.stderr
