"""Hostile and careless use of the command line (output sets, bad --embeddings content,
unwritable outputs, out-of-range options, SIGTERM) and work that must not need the compiled
ops. Each case checks the exit status, the single line on stderr, and that no file was lost
or mixed. Faults are injected through CHAMELEON_FAULT (chameleon_ext.io.fault_point), so the
tests are deterministic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from chameleon_ext.cli import main
from chameleon_ext.exports import EXPORT_FILES, load_weights
from chameleon_ext.mixture_formats import MIXTURE_FORMATS

ALL_EXPORT_FILES = [*EXPORT_FILES.values(), *MIXTURE_FORMATS.values()]
from chameleon_ext.manifest import MANIFEST_NAME
from chameleon_ext.model import GPT, GPTConfig, save_model

from .factories import write_text_domains
from .factories import run_cli as _run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--device", "cpu", "--quiet"]
DOMAINS = ["alpha", "digits", "dna"]



def _one_line_error(argv, capsys, *needles):
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"chameleon {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _save_embeddings(path, domains, embeddings):
    torch.save({"domains": domains, "embeddings": embeddings, "counts": [1] * len(embeddings), "settings": {}},
               path)
    return str(path)


def _subprocess(code: str, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    X = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return _save_embeddings(root / "domain_embeddings.pt", DOMAINS, X)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_domains(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, GPT(GPTConfig.preset("tiny", 257, 32)))
    return str(path)


def _weights_set(emb_file, out, capsys):
    code, _, err = _run(["weights", "--embeddings", emb_file, "--out", out, "--no-plots", *COMMON], capsys)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------- no compiled ops needed

BLOCK_C = """
import importlib.abc, sys

class _NoCompiledOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "chameleon_ext._C":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, _NoCompiledOps())
"""


def test_export_works_without_the_compiled_ops(tmp_path, emb_file, capsys):
    src = _weights_set(emb_file, tmp_path / "w", capsys)
    proc = _subprocess(BLOCK_C + f"""
import chameleon_ext
from chameleon_ext.cli import main
assert "chameleon_ext._C" not in sys.modules
code = main(["export", "--weights", {str(src / "weights.json")!r}, "--out", {str(tmp_path / "x")!r}])
assert "chameleon_ext._C" not in sys.modules and "chameleon_ext.ops" not in sys.modules
try:
    chameleon_ext.krls
except ImportError as exc:
    print("ops:", exc)
sys.exit(code)
""")
    assert proc.returncode == 0, proc.stderr
    assert "ops: chameleon_ext's compiled ops (chameleon_ext._C) could not be loaded: blocked by the test" in proc.stdout
    assert sorted(os.listdir(tmp_path / "x")) == sorted(ALL_EXPORT_FILES)
    weights = load_weights(str(src / "weights.json"))["weights"]
    hf = json.loads((tmp_path / "x" / "hf_interleave_probabilities.json").read_text())
    assert hf["domains"] == DOMAINS
    assert all(abs(p - weights[d]) <= 1e-12 for d, p in zip(DOMAINS, hf["probabilities"]))


def test_commands_that_need_the_ops_say_how_to_rebuild(tmp_path, emb_file):
    proc = _subprocess(BLOCK_C + f"""
from chameleon_ext.cli import main
sys.exit(main(["weights", "--embeddings", {emb_file!r}, "--out", {str(tmp_path / "w")!r}, "--quiet"]))
""")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chameleon weights: error: chameleon_ext's compiled ops")
    assert "pip install --no-build-isolation" in lines[0]


def test_importing_the_package_registers_the_ops():
    proc = _subprocess("""
import torch, chameleon_ext
K = torch.eye(3, dtype=torch.float64)
# a tensor lam takes the krls.lam_tensor overload (one lambda per matrix, or a 0-d tensor); a float the default one
print(torch.ops.chameleon.krls(K, torch.tensor(1.0, dtype=torch.float64), False, True).tolist())
""")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0.25, 0.25, 0.25]  # S_i = 1 / (1 + lambda k) = 1/4 for I_3, mu = 3


def test_domain_mean_pool_rejects_a_fractional_domain_count():
    import chameleon_ext

    with pytest.raises(ValueError, match="num_domains must be an integer, got 3.7"):
        chameleon_ext.domain_mean_pool(torch.randn(2, 3, 4), None, torch.zeros(2, dtype=torch.long), 3.7)


# --------------------------------------- output sets: a folder holds one run's outputs, or none


def test_a_complete_set_has_a_manifest_of_its_files(tmp_path, emb_file, capsys):
    out = _weights_set(emb_file, tmp_path / "w", capsys)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert set(manifest["files"]) == {"weights.json", "domain_embeddings.pt", *ALL_EXPORT_FILES}
    assert load_weights(str(out / "weights.json"))["domains"] == DOMAINS


@pytest.mark.parametrize("point", ["write:weights.json:replace", "write:domain_embeddings.pt:data",
                                   "write:mixture.yaml:replace"])
def test_a_killed_weights_run_leaves_a_set_every_reader_refuses(tmp_path, emb_file, capsys, point):
    out = _weights_set(emb_file, tmp_path / "w", capsys)  # a good previous set
    other = _save_embeddings(tmp_path / "other.pt", DOMAINS, torch.randn(3, 8, dtype=torch.float64))
    proc = subprocess.run([sys.executable, "-m", "chameleon_ext", "weights", "--embeddings", other, "--out", str(out),
                           "--no-plots", "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "CHAMELEON_FAULT": f"{point}=kill"})
    assert proc.returncode == -signal.SIGKILL
    # whatever the kill point, no reader takes a file of a half-written set
    for argv, needle in [(["export", "--weights", out / "weights.json", "--out", tmp_path / "x"], "incomplete"),
                         (["weights", "--embeddings", out / "domain_embeddings.pt", "--out", tmp_path / "y",
                           *COMMON], "incomplete")]:
        _one_line_error(argv, capsys, needle, "run it again")
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []  # nothing exported
    # and a rerun makes the set whole again
    _weights_set(other, out, capsys)
    assert load_weights(str(out / "weights.json"))["domains"] == DOMAINS


def test_a_kill_before_the_first_file_leaves_the_old_set_whole(tmp_path, emb_file, capsys):
    out = _weights_set(emb_file, tmp_path / "w", capsys)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    other = _save_embeddings(tmp_path / "other.pt", DOMAINS, torch.randn(3, 8, dtype=torch.float64))
    proc = subprocess.run([sys.executable, "-m", "chameleon_ext", "weights", "--embeddings", other, "--out", str(out),
                           "--no-plots", "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "CHAMELEON_FAULT": "write:manifest.json:replace=kill"})
    assert proc.returncode == -signal.SIGKILL
    # The killed run leaves its lock on --out (with its pid) and no temp file that counts.
    lock = out / ".chameleon.lock"
    dead_pid = int(lock.read_text().split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    after = {name: (out / name).read_bytes() for name in os.listdir(out)
             if "chameleon-tmp" not in name and name != lock.name}
    assert after == before  # entirely old
    code, _, err = _run(["export", "--weights", out / "weights.json", "--out", tmp_path / "x"], capsys)
    assert code == 0, err
    # The next run on that folder takes the dead run's lock over and writes a whole new set.
    code, out_text, err = _run(["weights", "--embeddings", other, "--out", out, "--no-plots", "--quiet"], capsys)
    assert code == 0, err
    assert not lock.exists() and "stale lock" in out_text + err


def test_a_file_rewritten_by_another_run_is_refused(tmp_path, emb_file, capsys):
    a = _weights_set(emb_file, tmp_path / "a", capsys)
    other = _save_embeddings(tmp_path / "other.pt", DOMAINS, torch.randn(3, 8, dtype=torch.float64))
    b = _weights_set(other, tmp_path / "b", capsys)
    (a / "weights.json").write_bytes((b / "weights.json").read_bytes())  # b's weights beside a's exports
    _one_line_error(["train", "--weights", a / "weights.json", "--steps", "1", "--out", tmp_path / "run", *COMMON], capsys,
                    "weights.json", "does not match its output set")


def test_an_old_folder_without_a_manifest_is_read_as_before(tmp_path, emb_file, capsys):
    out = _weights_set(emb_file, tmp_path / "w", capsys)
    os.unlink(out / MANIFEST_NAME)
    code, _, err = _run(["export", "--weights", out / "weights.json", "--out", tmp_path / "x"], capsys)
    assert code == 0, err


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, emb_file, capsys, monkeypatch):
    out = _weights_set(emb_file, tmp_path / "w", capsys)
    before = (out / "mixture.yaml").read_bytes()
    monkeypatch.setenv("CHAMELEON_FAULT", "write:mixture.yaml:data=enospc")
    other = _save_embeddings(tmp_path / "other.pt", DOMAINS, torch.randn(3, 8, dtype=torch.float64))
    _one_line_error(["weights", "--embeddings", other, "--out", out, "--no-plots", *COMMON], capsys,
                    "mixture.yaml", "No space left on device")
    assert (out / "mixture.yaml").read_bytes() == before
    assert not [n for n in os.listdir(out) if "chameleon-tmp" in n]


# --------------------------------------------------------------------------- --embeddings content (8.9, 8.16)


def _bad_embeddings():
    X = torch.randn(3, 4, dtype=torch.float64)
    nan, inf = X.clone(), X.clone()
    nan[1, 2], inf[0, 0] = float("nan"), float("inf")
    yield "domains_string", "abc", X, "'domains': expected a list of domain names"
    yield "duplicate_names", ["a", "b", "a"], X, "names must be unique, got ['a'] more than once"
    yield "nan", ["a", "b", "c"], nan, "NaN or Inf in row(s) [1]"
    yield "inf", ["a", "b", "c"], inf, "NaN or Inf in row(s) [0]"
    yield "d_zero", ["a", "b", "c"], torch.zeros(3, 0, dtype=torch.float64), "k, d >= 1"
    yield "k_zero", [], torch.zeros(0, 4, dtype=torch.float64), "k, d >= 1"
    yield "gram_overflow", ["a", "b", "c"], torch.full((3, 4), 1e200, dtype=torch.float64), "overflows float64"
    yield "complex", ["a", "b", "c"], torch.randn(3, 4, dtype=torch.complex128), "must be real"
    yield "wrong_rows", ["a", "b"], X, "expected embeddings [k, d] for 2 domains"


BAD_EMBEDDINGS = list(_bad_embeddings())


@pytest.mark.parametrize("case, domains, X, needle", BAD_EMBEDDINGS, ids=[c[0] for c in BAD_EMBEDDINGS])
def test_bad_embeddings_content_names_the_file_and_the_fault(tmp_path, capsys, case, domains, X, needle):
    path = _save_embeddings(tmp_path / f"{case}.pt", domains, X)
    _one_line_error(["weights", "--embeddings", path, "--out", tmp_path / "w", *COMMON], capsys,
                    f"embeddings file {path!r}", needle)
    assert not (tmp_path / "w" / "weights.json").exists()


@pytest.mark.parametrize("extra", [["--data", "builtin"], ["--proxy", "p.pt"]])
def test_embeddings_with_data_or_proxy_is_refused(tmp_path, emb_file, capsys, extra):
    _one_line_error(["weights", "--embeddings", emb_file, *extra, "--out", tmp_path / "w", *COMMON], capsys,
                    f"{extra[0]} cannot be used with --embeddings")


def test_a_domain_name_the_megatron_blend_cannot_hold_skips_only_that_export(tmp_path, capsys):
    path = _save_embeddings(tmp_path / "e.pt", ["web text", "code", "books"], torch.randn(3, 4, dtype=torch.float64))
    code, out, err = _run(["weights", "--embeddings", path, "--out", tmp_path / "w", "--no-plots", *COMMON], capsys)
    assert code == 0, err
    assert "skipped the megatron export" in out and "'web text'" in out
    files = set(os.listdir(tmp_path / "w"))
    assert "megatron_data_path.txt" not in files
    assert {"weights.json", "hf_interleave_probabilities.json", "mixture.yaml", MANIFEST_NAME} <= files
    assert load_weights(str(tmp_path / "w" / "weights.json"))["domains"] == ["web text", "code", "books"]


# --------------------------------------------------------------------------- options (8.9, 8.15, 8.17, 8.18)


@pytest.mark.parametrize("command", ["train", "train-proxy", "weights", "embed", "run"])
def test_out_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, emb_file, tiny_model, data, command):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    extra = {"weights": ["--embeddings", emb_file], "embed": ["--proxy", tiny_model, "--data", data],
             "train": ["--data", data], "train-proxy": ["--data", data], "run": ["--data", data]}[command]
    _one_line_error([command, *extra, "--out", target, *COMMON], capsys, "--out", "is an existing file")
    assert target.read_text() == "keep me"


def test_eval_out_that_is_a_folder(tmp_path, capsys, data, tiny_model):
    _one_line_error(["eval", "--data", data, "--model", tiny_model, "--out", tmp_path, *COMMON], capsys,
                    "--out", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(tmp_path, capsys, emb_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_line_error(["weights", "--embeddings", emb_file, "--out", ro, *COMMON], capsys, "not writable")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("seed", [str(2**64), "-1", str(-(2**70))])
def test_seed_out_of_range(tmp_path, capsys, emb_file, seed):
    with pytest.raises(SystemExit) as exc:
        main(["weights", "--embeddings", emb_file, "--seed", seed, "--out", str(tmp_path / "w")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chameleon weights: error: argument --seed: expected an integer in [0, 2**64 - 1], got {seed}"]


def test_largest_seed_is_accepted(tmp_path, capsys, emb_file):
    code, _, err = _run(["weights", "--embeddings", emb_file, "--seed", str(2**64 - 1), "--out", tmp_path / "w",
                         "--no-plots", *COMMON], capsys)
    assert code == 0, err


def test_empty_data_path_is_an_error(capsys, tmp_path):
    _one_line_error(["train", "--data", "", "--out", tmp_path / "t", *COMMON], capsys, "--data", "empty string")


def test_eval_negative_block_size_names_the_option(capsys, data, tiny_model):
    _one_line_error(["eval", "--data", data, "--model", tiny_model, "--block-size", "-1", *COMMON], capsys,
                    "--block-size", "positive integer", "-1")


@pytest.mark.parametrize("argv, option", [
    (["train", "--batch-size", str(10**12)], "--batch-size"),
    (["train", "--eval-windows", str(10**13)], "--eval-windows"),
    (["eval", "--eval-windows", str(10**13)], "--eval-windows"),
    (["embed", "--n-windows", str(10**15)], "--n-windows"),
])
def test_sizes_too_large_for_memory_say_how_much_they_need(tmp_path, capsys, data, tiny_model, argv, option):
    extra = {"train": ["--preset", "tiny", "--block-size", "32"], "eval": ["--model", tiny_model],
             "embed": ["--proxy", tiny_model, "--window", "16"]}[argv[0]]
    line = _one_line_error([*argv, *extra, "--data", data, "--out", tmp_path / "o", *COMMON], capsys,
                           option, "needs at least", "this machine has")
    assert "GiB" in line


def test_eval_every_zero_evaluates_at_the_end(tmp_path, capsys, data):
    out = tmp_path / "t"
    code, _, err = _run(["train", "--data", data, "--out", out, "--steps", "2", "--preset", "tiny", "--block-size",
                         "32", "--batch-size", "2", "--eval-windows", "2", "--eval-every", "0", *COMMON], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2]


def test_sigterm_prints_one_line_and_leaves_no_mixed_set(tmp_path, emb_file):
    out = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": REPO, "CHAMELEON_FAULT": "write:weights.json:open=sleep:120"}
    proc = subprocess.Popen([sys.executable, "-m", "chameleon_ext", "weights", "--embeddings", emb_file, "--out",
                             str(out), "--no-plots", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # The manifest saying "incomplete" is written just before the paused weights.json.
        for _ in range(6000):
            if (out / MANIFEST_NAME).exists() or proc.poll() is not None:
                break
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["chameleon weights: interrupted by SIGTERM (no file was mixed)"]
    assert not (out / "weights.json").exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False


def test_eval_zero_windows_names_the_option(capsys, data, tiny_model):
    _one_line_error(["eval", "--data", data, "--model", tiny_model, "--eval-windows", "0", *COMMON], capsys,
                    "--eval-windows", "positive integer")


def test_manifest_edge_cases(tmp_path):
    from chameleon_ext.errors import ChameleonUserError
    from chameleon_ext.manifest import begin_set, check_member, finish_set

    a, b = tmp_path / "a.json", tmp_path / "b.txt"
    a.write_text("{}")
    b.write_text("b")
    check_member(str(a))  # no manifest: read as before
    begin_set(str(tmp_path))
    with pytest.raises(ChameleonUserError, match="incomplete output set"):
        check_member(str(a), "weights file")
    finish_set(str(tmp_path), [str(a), str(b), "/elsewhere/c.txt"])  # a file of another folder is not recorded
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"a.json", "b.txt"}
    check_member(str(a))
    (tmp_path / "notes.txt").write_text("added by hand")
    check_member(str(tmp_path / "notes.txt"))  # not part of the set: not checked
    b.write_text("changed")
    with pytest.raises(ChameleonUserError, match="does not match its output set"):
        check_member(str(b))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other/1", "complete": True}))
    with pytest.raises(ChameleonUserError, match="unknown format 'other/1'"):
        check_member(str(a))


# --------------------------------------------------------------------------- export-model killed midway

EXPORT_KILL = """
import sys
import chameleon_ext.io
if sys.argv[1] == "no-exchange":  # a filesystem without renameat2's exchange: the two-rename path
    chameleon_ext.io._exchange = lambda a, b: False
from chameleon_ext.cli import main
sys.exit(main(["export-model", "--model", sys.argv[2], "--hf", sys.argv[3]]))
"""


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (1, 2):
        paths.append(str(root / f"m{seed}.pt"))
        save_model(paths[-1], GPT(GPTConfig.preset("tiny", 257, 32), seed=seed))
    return paths


@pytest.mark.parametrize("swap", ["exchange", "no-exchange"])
@pytest.mark.parametrize("point", ["write:config.json:replace", "write:model.safetensors:data",
                                   "write:tokenizer.json:replace", "folder:hf:staged", "folder:hf:aside",
                                   "folder:hf:swapped"])
def test_a_killed_export_model_leaves_the_old_folder_or_the_new_one(tmp_path, two_models, capsys, swap, point):
    transformers = pytest.importorskip("transformers")
    if point == "folder:hf:aside" and swap == "exchange":
        pytest.skip("the aside rename is the fallback's only")
    hf = tmp_path / "hf"
    code, _, err = _run(["export-model", "--model", two_models[0], "--hf", hf], capsys)
    assert code == 0, err
    old = _files(hf)
    env = {**os.environ, "PYTHONPATH": REPO, "CHAMELEON_FAULT": f"{point}=kill"}
    proc = subprocess.run([sys.executable, "-c", EXPORT_KILL, swap, two_models[1], str(hf)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if point == "folder:hf:aside":  # killed between the two renames: the next export puts the old one back
        assert not hf.exists()
        code, _, err = _run(["export-model", "--model", two_models[0], "--hf", hf], capsys)
        assert code == 0, err
        assert _files(hf) == old
    elif point == "folder:hf:swapped":
        new = _files(hf)
        assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]
    else:
        assert _files(hf) == old  # the old folder, whole
    transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)  # loads either way
    # a later export leaves nothing of the killed one behind
    code, _, err = _run(["export-model", "--model", two_models[1], "--hf", hf], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["hf"], os.listdir(tmp_path)
    assert _files(hf).keys() == old.keys()
