"""The one memory probe (chameleon_ext.memory) behind the command line's and the bootstrap's
"cannot fit" checks."""

import os

import pytest

from chameleon_ext import memory


def test_format_bytes_exact():
    assert memory.format_bytes(2**30) == "1.0 GiB"
    assert memory.format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert memory.format_bytes(300 * 2**20) == "300 MiB"
    assert memory.format_bytes(2**30 - 1) == "1,024 MiB"
    assert memory.format_bytes(3 * 2**40) == "3,072.0 GiB"


def test_physical_memory_matches_sysconf():
    assert memory.physical_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_available_memory_on_the_host_is_meminfo(monkeypatch, tmp_path):
    got = memory.available_memory("cpu")
    assert got is not None and 0 < got <= memory.physical_memory()
    # MemAvailable is read from /proc/meminfo when there is one
    with open("/proc/meminfo") as f:
        line = next(l for l in f if l.startswith("MemAvailable:"))
    assert abs(got - int(line.split()[1]) * 1024) < 2**30  # read a moment apart


def test_available_memory_falls_back_to_physical_memory(monkeypatch):
    real_open = open

    def no_meminfo(path, *a, **k):
        if path == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", no_meminfo)
    assert memory.available_memory("cpu") == memory.physical_memory()


@pytest.mark.parametrize("device", ["meta", "cuda:7"])
def test_available_memory_unknown_devices(device):
    got = memory.available_memory(device)
    # meta has no memory to bound by; cuda:7 does not exist on this machine (or has its own free memory)
    assert got is None or (device.startswith("cuda") and got > 0)


def test_one_probe_behind_both_checks():
    import chameleon_ext.cli.checks as checks
    import chameleon_ext.uncertainty.bootstrap as bootstrap

    assert checks.physical_memory is memory.physical_memory
    assert bootstrap.available_memory is memory.available_memory
    assert not hasattr(checks, "check_bootstrap_memory")  # one name, one signature
