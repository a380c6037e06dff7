"""Overhead of online Chameleon weights against a training step.

Providers, on the project's small GPT (4 blocks, 4 heads; width 128 = the ``small`` preset,
and width 384, the [16, 256, 384] hidden state of the issue), batch 16 x 256 tokens, fp32 on
the CPU (as the trainer runs there), AdamW:

* ``train_step``        -- forward + backward + optimiser step, static weights (the baseline);
* ``train_step_online`` -- the same with a forward hook on the middle block feeding
                           :meth:`OnlineChameleon.observe` and :meth:`~OnlineChameleon.end_step`
                           (no update due): what every step pays;
* ``online_step``       -- observe + end_step alone on a [16, 256, H] hidden state (fp32 and
                           bf16): the pooling and EMA;
* ``online_update``     -- one weights update (all-reduce no-op, the host copy, KRLS, softmax,
                           floor), paid every ``every`` steps.

The goal is below 2% of the step: (online_step + online_update / every) / train_step.
``python benchmarks/bench_online.py`` prints that ratio, timing the providers interleaved
(alternating rounds, medians) so that load on a shared machine hits all of them alike.
Smoke run (``--benchmark-disable``): QUICK_CASES, seconds.

End to end (``python benchmarks/bench_online.py e2e [ROUNDS [STEPS]]``, one thread): whole runs of the
trainer as ``chameleon train`` builds them (its parser, data, model, and for ``online`` its
``OnlineWeights`` callback from ``cli.train.online_callback``), on the built-in data, ``--weights
online`` against static uniform weights, alternating runs. A step's time is the time between
two ``on_step_end`` calls: sampling, forward, backward, optimiser, every callback, and the
weight updates (every ``E2E_EVERY`` steps here, more often than the default, so the updates
weigh more than in a real run). Reported, for the wall clock and for the process CPU time
(which waiting for a core on a loaded machine does not inflate): per round the ratio of the
summed step times after the first two steps, and the median over rounds.
"""

from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch

from chameleon_ext.callbacks import Callback
from chameleon_ext.model import GPT, GPTConfig
from chameleon_ext.online import OnlineChameleon
from python_tests.factories import make_domain_ids, make_hidden

# (batch, tokens, width)
CASES = [(16, 256, 128), (16, 256, 384)]
QUICK_CASES = [(4, 32, 64)]
DOMAINS = [f"domain{i}" for i in range(7)]
EVERY = 50
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(case):
    B, T, H = case
    return GPT(GPTConfig(vocab_size=257, n_layer=4, n_head=4, n_embd=H, block_size=T), seed=0)


def _inputs(case):
    B, T, H = case
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 257, (B, T + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous(), make_domain_ids(B, len(DOMAINS))


def _train_step(case, online: bool):
    """A closure running one training step (with the online hook when ``online``)."""
    model = _model(case)
    x, y, ids = _inputs(case)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if online:
        tracker = OnlineChameleon(DOMAINS, every=10**9, warmup=10**9)
        layer = model.default_embedding_layer
        model.blocks[layer - 1].register_forward_hook(lambda mod, inp, out: tracker.observe(out, None, ids))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if online:
            tracker.end_step()

    return step


def _online_step(case, dtype):
    B, T, H = case
    hidden = make_hidden(B, T, H, dtype=dtype)
    ids = make_domain_ids(B, len(DOMAINS))
    tracker = OnlineChameleon(DOMAINS, every=10**9, warmup=10**9)

    def step():
        tracker.observe(hidden, None, ids)
        tracker.end_step()

    return step


def _online_update(case):
    B, T, H = case
    tracker = OnlineChameleon(DOMAINS, every=1, warmup=1)
    tracker.observe(make_hidden(B, T, H), None, torch.arange(B) % len(DOMAINS))
    tracker.end_step()
    return tracker._update  # the update alone, on the EMA state


@pytest.mark.parametrize("online", [False, True], ids=["train_step", "train_step_online"])
def bench_train_step(benchmark, case, online):
    step = _train_step(case, online)
    step()  # warm-up
    benchmark.group = f"online overhead {list(case)}"
    benchmark.extra_info.update(provider="train_step_online" if online else "train_step", shape=list(case))
    benchmark(step)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_online_step(benchmark, case, dtype_name):
    step = _online_step(case, DTYPES[dtype_name])
    step()
    benchmark.group = f"online overhead {list(case)}"
    benchmark.extra_info.update(provider=f"online_step_{dtype_name}", shape=list(case), dtype=dtype_name)
    benchmark(step)


def bench_online_update(benchmark, case):
    update = _online_update(case)
    u = update()
    assert abs(float(u.weights.sum()) - 1.0) < 1e-12 and float(u.weights.min()) >= 0.01 * (1 - 1e-12)
    benchmark.group = f"online overhead {list(case)}"
    benchmark.extra_info.update(provider="online_update", shape=list(case), every=EVERY)
    benchmark(update)


# --------------------------------------------------------------------------- ratio report


def _interleaved(fns, rounds):
    """Median seconds of each closure, timed in alternating rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(cases=CASES, rounds=15, threads=None):
    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"medians of {rounds} interleaved rounds\n")
    print("| shape [B, T, H] | train step | + online hook | online step fp32 | online step bf16 | update | "
          "overhead (pooling + EMA + update / 50) | end to end (hook) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        fns = {"train": _train_step(case, False), "train_online": _train_step(case, True),
               "fp32": _online_step(case, torch.float32), "bf16": _online_step(case, torch.bfloat16),
               "update": _online_update(case)}
        for fn in fns.values():
            fn()  # warm-up
        t = _interleaved(fns, rounds)
        parts = (t["fp32"] + t["update"] / EVERY) / t["train"]
        e2e = (t["train_online"] - t["train"]) / t["train"]
        ms = {k: f"{v * 1e3:.2f} ms" for k, v in t.items()}
        print(f"| {list(case)} | {ms['train']} | {ms['train_online']} | {ms['fp32']} | {ms['bf16']} | {ms['update']} "
              f"| {100 * parts:.2f}% | {100 * e2e:+.2f}% |")


# --------------------------------------------------------------------------- end to end

E2E_EVERY = 10
# the run both providers make: the small preset on the built-in data
E2E_ARGS = ["--preset", "small", "--block-size", "128", "--batch-size", "8", "--device", "cpu", "--quiet",
            "--eval-every", "0", "--eval-windows", "0", "--ckpt-every", "0"]
QUICK_E2E_ARGS = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--device", "cpu", "--quiet",
                  "--eval-every", "0", "--eval-windows", "0", "--ckpt-every", "0"]


class _StepClock(Callback):
    """A trainer callback recording the wall and the process CPU time of every on_step_end
    (placed last). CPU time is what a loaded machine disturbs least: waiting for a core is
    not counted."""

    def __init__(self):
        self.times = []

    def on_step_end(self, state):
        self.times.append((time.perf_counter(), time.process_time()))


def _e2e_run(online: bool, steps: int, out: str, base_args) -> dict:
    """``{"wall": [...], "cpu": [...]}`` step times (s) of one ``chameleon train`` run, online
    or with static uniform weights."""
    from chameleon_ext.cli import build_parser
    from chameleon_ext.cli.common import dataset, train_config
    from chameleon_ext.cli.train import online_callback
    from chameleon_ext.trainer import train

    extra = ["--weights", "online", "--online-every", str(E2E_EVERY), "--online-warmup", "2"] if online else []
    args = build_parser().parse_args(["train", "--steps", str(steps), "--out", out, *base_args, *extra])
    ds = dataset(args)
    model = GPT(GPTConfig.preset(args.preset, ds.vocab_size, args.block_size), seed=0)
    cfg = train_config(args, out, steps)
    cfg.block_size = args.block_size
    clock, weights, callbacks = _StepClock(), "uniform", []
    if online:
        weights, cb = online_callback(args, ds, model, f"{out}/schedule.json")
        callbacks.append(cb)
    start = (time.perf_counter(), time.process_time())
    train(model, ds, weights, cfg, resume=False, callbacks=[*callbacks, clock])
    times = [start] + clock.times
    return {clock_name: [b[i] - a[i] for a, b in zip(times, times[1:])] for i, clock_name in enumerate(("wall", "cpu"))}


def report_end_to_end(rounds=6, steps=12, base_args=E2E_ARGS, threads=1):
    """Print and return the per-round ratios ``{"wall": [...], "cpu": [...]}`` of online to
    static summed step times (the first two steps left out)."""
    import os
    import tempfile

    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, load average "
          f"{os.getloadavg()[0]:.1f} at the start; chameleon train {' '.join(base_args)}, {steps} steps, "
          f"online every {E2E_EVERY}; {rounds} alternating rounds\n")
    ratios = {"wall": [], "cpu": []}
    per_step = {("static", "wall"): [], ("online", "wall"): [], ("static", "cpu"): [], ("online", "cpu"): []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            t = {kind: _e2e_run(kind == "online", steps, f"{tmp}/{kind}{r}", base_args)
                 for kind in (("static", "online") if r % 2 == 0 else ("online", "static"))}
            for clock in ratios:
                on, st = t["online"][clock][2:], t["static"][clock][2:]
                ratios[clock].append(sum(on) / sum(st))
                per_step["static", clock].append(1e3 * statistics.median(st))
                per_step["online", clock].append(1e3 * statistics.median(on))
            print(f"round {r}: ms/step static {per_step['static', 'wall'][-1]:.1f} wall "
                  f"{per_step['static', 'cpu'][-1]:.1f} cpu, online {per_step['online', 'wall'][-1]:.1f} wall "
                  f"{per_step['online', 'cpu'][-1]:.1f} cpu; online / static {ratios['wall'][-1]:.4f} wall "
                  f"{ratios['cpu'][-1]:.4f} cpu; load {os.getloadavg()[0]:.1f}")
    for clock, rs in ratios.items():
        print(f"{clock}: static {statistics.median(per_step['static', clock]):.1f} ms/step, online "
              f"{statistics.median(per_step['online', clock]):.1f} ms/step; overhead, median over rounds "
              f"{100 * (statistics.median(rs) - 1):+.2f}% (rounds {100 * (min(rs) - 1):+.2f}% to "
              f"{100 * (max(rs) - 1):+.2f}%)")
    return ratios


def bench_end_to_end_smoke(benchmark):
    """The end-to-end report on a tiny run (what ``e2e`` measures; a smoke test of it)."""
    ratios = report_end_to_end(rounds=1, steps=4, base_args=QUICK_E2E_ARGS, threads=None)
    assert len(ratios["wall"]) == 1 and ratios["wall"][0] > 0 and ratios["cpu"][0] > 0
    benchmark.extra_info.update(provider="end_to_end", ratio_wall=ratios["wall"][0], ratio_cpu=ratios["cpu"][0])
    benchmark(lambda: None)


if __name__ == "__main__":
    # python benchmarks/bench_online.py [ROUNDS [THREADS]]  |  python benchmarks/bench_online.py e2e [ROUNDS [STEPS]]
    if len(sys.argv) > 1 and sys.argv[1] == "e2e":
        report_end_to_end(rounds=int(sys.argv[2]) if len(sys.argv) > 2 else 6,
                          steps=int(sys.argv[3]) if len(sys.argv) > 3 else 12)
    else:
        report(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 15,
               threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
