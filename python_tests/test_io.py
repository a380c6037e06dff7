"""chameleon_ext.io: the atomic writer, durable appends, the readers, stale temp files, the
folder lock and fault points. Each failure must name the path and leave the previous file."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from chameleon_ext import io
from chameleon_ext.errors import ChameleonUserError


def _temps(folder):
    return [n for n in os.listdir(folder) if n.endswith(".chameleon-tmp")]


def test_atomic_write_replaces_whole_file_with_0644(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.write_json(path, {"x": [1, 2.5]})
    assert json.loads(path.read_text()) == {"x": [1, 2.5]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    io.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert _temps(path.parent) == []


@pytest.mark.parametrize("point", ["open", "data", "replace"])
def test_full_disk_keeps_previous_file_and_names_path(tmp_path, monkeypatch, point):
    path = tmp_path / "w.json"
    io.write_json(path, {"v": 1})
    monkeypatch.setenv(io.FAULT_ENV, f"write:w.json:{point}=enospc")
    with pytest.raises(ChameleonUserError) as ei:
        io.write_json(path, {"v": 2}, "weights file")
    msg = str(ei.value)
    assert "weights file" in msg and str(path) in msg and "No space left on device" in msg
    assert "\n" not in msg
    assert json.loads(path.read_text()) == {"v": 1}
    assert _temps(tmp_path) == []  # no 0-byte or partial temp file either


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ChameleonUserError, match="Out of range float"):
        io.write_json(tmp_path / "n.json", {"loss": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_write_into_a_folder_or_a_file_path_is_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ChameleonUserError, match="it is a folder"):
        io.write_text(tmp_path / "d", "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ChameleonUserError, match="existing file"):
        io.check_writable_folder(tmp_path / "f")
    with pytest.raises(ChameleonUserError, match="empty string"):
        io.check_writable_folder("")


def test_append_line_is_durable_and_single_line(tmp_path):
    path = tmp_path / "m.jsonl"
    io.append_line(path, '{"a": 1}')
    io.append_line(path, '{"a": 2}')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    with pytest.raises(ValueError):
        io.append_line(path, "two\nlines")


def test_readers_name_the_file_and_fault(tmp_path):
    with pytest.raises(ChameleonUserError, match="does not exist"):
        io.read_json(tmp_path / "none.json", "weights file")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChameleonUserError, match=r"not valid JSON .*line 1"):
        io.read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ChameleonUserError, match="expected a JSON object"):
        io.read_json(tmp_path / "list.json")
    assert io.read_json_or_none(tmp_path / "bad.json") is None
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ChameleonUserError, match="junk.pt.*cannot be read"):
        io.read_torch(tmp_path / "junk.pt", "checkpoint")
    io.save_torch({"t": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(io.read_torch(tmp_path / "ok.pt")["t"], torch.arange(3))


def test_remove_stale_temps_only_of_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".ckpt.pt.{host}.{dead_pid}.0a0b0c0d.chameleon-tmp"
    live = tmp_path / f".ckpt.pt.{host}.{os.getpid()}.0a0b0c0d.chameleon-tmp"
    other_host = tmp_path / f".ckpt.pt.elsewhere.{dead_pid}.0a0b0c0d.chameleon-tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"x")
    assert io.remove_stale_temps(tmp_path) == [str(stale)]
    assert sorted(_temps(tmp_path)) == sorted([live.name, other_host.name])


def test_remove_stale_temps_of_one_base_takes_dead_folders_too(tmp_path):
    """A half-built folder (the built-in dataset's) named by temp_path is removed with its
    files once its writer is dead; other bases' temps are left for their own writers."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname().replace(".", "_")
    folder = tmp_path / f".builtin-v1.{host}.{int(dead.stdout)}.0a0b0c0d.chameleon-tmp"
    (folder / "web").mkdir(parents=True)
    (folder / "web" / "a.txt").write_text("x")
    other = tmp_path / f".ckpt.pt.{host}.{int(dead.stdout)}.0a0b0c0d.chameleon-tmp"
    other.write_bytes(b"x")
    mine = io.temp_path(tmp_path / "builtin-v1")
    os.mkdir(mine)  # a live build (this process)
    assert os.path.basename(mine).startswith(".builtin-v1.") and mine.endswith(".chameleon-tmp")
    assert io.remove_stale_temps(tmp_path, base="builtin-v1") == [str(folder)]
    assert sorted(_temps(tmp_path)) == sorted([os.path.basename(mine), other.name])


def test_folder_lock_excludes_a_second_run_and_takes_over_stale_locks(tmp_path):
    with io.FolderLock(tmp_path / "out"):
        with pytest.raises(ChameleonUserError, match=f"in use by process {os.getpid()}"):
            io.FolderLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out" / io.FolderLock.NAME).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / "out" / io.FolderLock.NAME).write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    seen = []
    lock = io.FolderLock(tmp_path / "out", on_stale=seen.append).acquire()
    assert lock.held and len(seen) == 1 and "stale lock" in seen[0]
    lock.release()


def test_fault_point_kill_leaves_previous_file_and_a_stale_temp(tmp_path):
    path = tmp_path / "x.json"
    io.write_json(path, {"v": 1})
    code = ("from chameleon_ext import io; import sys; "
            "io.write_json(sys.argv[1], {'v': 2})")
    env = dict(os.environ, **{io.FAULT_ENV: "write:x.json:replace=kill"})
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env)
    assert proc.returncode == -9  # SIGKILL
    assert json.loads(path.read_text()) == {"v": 1}
    assert len(_temps(tmp_path)) == 1  # the killed writer's, with its data
    assert len(io.remove_stale_temps(tmp_path)) == 1 and _temps(tmp_path) == []


def test_fault_point_actions(monkeypatch):
    io.fault_point("anything")  # no-op without the variable
    monkeypatch.setenv(io.FAULT_ENV, "a:*=raise, b:1=eio")
    with pytest.raises(RuntimeError, match="fault injected at a:x"):
        io.fault_point("a:x")
    with pytest.raises(OSError) as ei:
        io.fault_point("b:1")
    assert ei.value.errno == 5
    io.fault_point("b:2")  # not named: nothing happens


# -- whole folders (staged_folder) --------------------------------------------------------------


def _tree(folder):
    return {n: (folder / n).read_text() for n in sorted(os.listdir(folder))}


@pytest.mark.parametrize("exchange", [True, False])
def test_staged_folder_replaces_the_whole_folder_or_nothing(tmp_path, monkeypatch, exchange):
    from chameleon_ext import io as cio

    if not exchange:
        monkeypatch.setattr(cio, "_exchange", lambda a, b: False)
    target = tmp_path / "set"
    with cio.staged_folder(target) as staged:  # no folder yet
        cio.write_text(os.path.join(staged, "a.txt"), "1")
        cio.write_text(os.path.join(staged, "b.txt"), "1")
    assert _tree(target) == {"a.txt": "1", "b.txt": "1"}
    with pytest.raises(RuntimeError, match="midway"):  # a failure before the swap: the old folder whole
        with cio.staged_folder(target) as staged:
            cio.write_text(os.path.join(staged, "a.txt"), "2")
            raise RuntimeError("midway")
    assert _tree(target) == {"a.txt": "1", "b.txt": "1"}
    with cio.staged_folder(target) as staged:  # a new set drops the old set's files
        cio.write_text(os.path.join(staged, "c.txt"), "3")
    assert _tree(target) == {"c.txt": "3"}
    assert sorted(os.listdir(tmp_path)) == ["set"]  # no temp folder left


def test_recover_folder_puts_back_a_folder_moved_aside_by_a_dead_writer(tmp_path):
    from chameleon_ext import io as cio

    target = tmp_path / "set"
    aside = tmp_path / f".set~previous.{cio._HOST}.999999999.0000.chameleon-tmp"  # pid 999999999: not alive
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    cio.remove_stale_temps(tmp_path)  # never deletes a folder moved aside
    assert aside.exists()
    cio.recover_folder(str(target))
    assert _tree(target) == {"a.txt": "old"} and not aside.exists()
    aside.mkdir()  # killed after the swap: the new folder stays, the aside one goes
    cio.recover_folder(str(target))
    assert _tree(target) == {"a.txt": "old"} and sorted(os.listdir(tmp_path)) == ["set"]


def test_staged_folder_through_a_symlink_replaces_the_real_folder(tmp_path):
    from chameleon_ext import io as cio

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("old")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with cio.staged_folder(tmp_path / "link") as staged:
        cio.write_text(os.path.join(staged, "a.txt"), "new")
    assert os.path.islink(tmp_path / "link") and (tmp_path / "link" / "a.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
