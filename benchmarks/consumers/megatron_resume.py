"""Megatron's learning-rate schedule through a stage change, on megatron-core's own
OptimizerParamScheduler (CPU: the scheduler only writes ``lr`` / ``weight_decay`` into the
optimizer's param groups, so a one-parameter torch SGD stands in for Megatron's optimizer).

The launch arguments are read from the exported ``megatron_stages.txt`` (what users copy: the
"every launch" line plus the stage's ``--data-path``), with the arguments a user adds and keeps
fixed across stages (global batch size, learning rates, warmup, decay style). What Megatron-LM
does with them lives in Megatron-LM's training package, which is not part of the megatron-core
wheel, so the argument arithmetic is mirrored here, as read in Megatron-LM core_v0.16.1:
``training.get_optimizer_param_scheduler`` (iteration-based branch: steps are samples,
``lr_decay_steps = lr_decay_iters x global_batch_size``, ``lr_decay_iters`` defaulting to
``train_iters``, ``wd_incr_steps = train_iters x global_batch_size``, warmup from
``--lr-warmup-fraction x lr_decay_steps`` or ``--lr-warmup-iters x global_batch_size``,
``--lr-wsd-decay-iters x global_batch_size``), ``train_step`` (``step(increment=global batch)``
per iteration), the exit check (save and exit when the iteration is a phase transition or the
last), ``checkpointing.check_checkpoint_args`` (the global batch size must match when
``--phase-transition-iterations`` is set), ``get_train_valid_test_num_samples`` and
``build_train_valid_test_data_loaders`` (a phase's dataset holds the samples from its transition
to the next, none consumed yet), and the defaults of ``training_config.SchedulerConfig``
(``use_checkpoint_opt_param_scheduler`` and ``override_opt_param_scheduler`` both False, which
is what makes ``load_state_dict`` assert that the checkpoint's values match the new launch's).
The scheduler, its state dict and its checks are megatron-core's, unmodified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

TOL = 1e-12

# What a user adds to every launch (the export cannot know them); one set per decay style, so
# warmup by iterations and by fraction, WSD annealing and an increasing weight decay are covered.
USER_ARGS = {
    "cosine": "--global-batch-size 4 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 10 --lr-decay-style cosine",
    "linear": "--global-batch-size 8 --lr 1e-3 --lr-warmup-fraction 0.1 --lr-decay-style linear "
              "--weight-decay-incr-style linear --start-weight-decay 0.0 --end-weight-decay 0.1",
    "WSD": "--global-batch-size 4 --lr 2e-4 --min-lr 2e-6 --lr-warmup-iters 5 --lr-decay-style WSD "
           "--lr-wsd-decay-iters 20 --lr-wsd-decay-style cosine",
}


def _parser() -> argparse.ArgumentParser:
    """Megatron-LM's names and defaults for the arguments the scheduler reads."""
    p = argparse.ArgumentParser(prog="megatron-launch", add_help=False)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--lr-decay-iters", type=int)
    p.add_argument("--phase-transition-iterations", type=str)
    p.add_argument("--data-path", nargs="*")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-warmup-init", type=float, default=0.0)
    p.add_argument("--lr-warmup-iters", type=int, default=0)
    p.add_argument("--lr-warmup-fraction", type=float)
    p.add_argument("--lr-decay-style", default="linear")
    p.add_argument("--lr-wsd-decay-iters", type=int)
    p.add_argument("--lr-wsd-decay-style", default="exponential")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--start-weight-decay", type=float)
    p.add_argument("--end-weight-decay", type=float)
    p.add_argument("--weight-decay-incr-style", default="constant")
    return p


def parse_launch(argv):
    """Megatron's argument post-processing for these arguments (validate_args)."""
    args = _parser().parse_args(argv)
    if args.phase_transition_iterations:
        args.phase_transition_iterations = sorted(int(x.strip()) for x in args.phase_transition_iterations.split(","))
    if args.lr_warmup_fraction is not None:
        assert args.lr_warmup_iters == 0, "can only specify one of lr-warmup-fraction and lr-warmup-iters"
    if args.weight_decay_incr_style == "constant":
        assert args.start_weight_decay is None and args.end_weight_decay is None
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    return args


def build_scheduler(args):
    """A fresh optimizer and the scheduler get_optimizer_param_scheduler builds from ``args``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    assert args.train_iters, "iteration-based training needs --train-iters"
    decay_iters = args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters
    lr_decay_steps = decay_iters * args.global_batch_size
    wsd = None if args.lr_wsd_decay_iters is None else args.lr_wsd_decay_iters * args.global_batch_size
    warmup = (args.lr_warmup_fraction * lr_decay_steps if args.lr_warmup_fraction is not None
              else args.lr_warmup_iters * args.global_batch_size)
    sched = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=lr_decay_steps, lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style=args.weight_decay_incr_style, use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False, wsd_decay_steps=wsd, lr_wsd_decay_style=args.lr_wsd_decay_style)
    return optimizer, sched


def exported_launches(folder):
    """Per stage: ``(start, end, argv)`` from megatron_stages.txt, argv being the shared
    "# every launch:" arguments plus the stage's ``--data-path`` line."""
    shared, stages = None, []
    with open(os.path.join(folder, "megatron_stages.txt")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# every launch:"):
                shared = shlex.split(line.split(":", 1)[1])
            elif line.startswith("# iterations ["):
                m = re.fullmatch(r"# iterations \[(\d+), (\d+|end)\)", line)
                stages.append([int(m[1]), None if m[2] == "end" else int(m[2]), None])
            elif line.startswith("--"):
                stages[-1][2] = shlex.split(line)
    assert shared is not None and stages and all(st[2] for st in stages), "megatron_stages.txt: unexpected layout"
    return [(start, end, shared + argv) for start, end, argv in stages]


def _run(sched, optimizer, gbs, start, stop, lrs):
    """train()'s loop from iteration ``start``: one scheduler step of a global batch per
    iteration, recording the learning rate and weight decay the next iteration trains with."""
    for it in range(start, stop):
        sched.step(increment=gbs)
        lrs[it + 1] = (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"])


def _stop(args, iteration):
    """Where a launch resumed at ``iteration`` saves and exits: the next phase transition, else
    its last iteration."""
    later = [t for t in (args.phase_transition_iterations or []) if t > iteration]
    return min(later + [args.train_iters])


def staged_run(launches, user, ckpt):
    """Run the stages as separate launches, each saving the scheduler (torch.save, as in a
    checkpoint) where it exits and the next building a new one from its own launch arguments
    and loading that state. Returns ``{iteration: (lr, wd)}``; raises what Megatron would."""
    lrs, saved, iteration = {}, None, 0
    for start, end, argv in launches:
        args = parse_launch(argv + user)
        optimizer, sched = build_scheduler(args)
        if saved is not None:
            state = torch.load(ckpt, weights_only=True)
            if args.phase_transition_iterations:  # check_checkpoint_args
                assert state["args"]["global_batch_size"] == args.global_batch_size, "global batch size changed"
            sched.load_state_dict(state["opt_param_scheduler"])
            iteration = state["iteration"]
            assert sched.num_steps == iteration * args.global_batch_size
        assert iteration == start, f"launch resumes at {iteration}, its stage starts at {start}"
        if args.phase_transition_iterations:  # the data this phase's launch builds
            bounds = [0, *args.phase_transition_iterations, args.train_iters]
            last = max(b for b in bounds if b <= iteration)
            nxt = min(b for b in bounds if b > iteration)
            assert (last, nxt) == (start, end if end is not None else args.train_iters), (last, nxt, start, end)
        stop = _stop(args, iteration)
        if end is not None:
            assert stop == end, f"the launch for [{start}, {end}) exits at {stop}"
        _run(sched, optimizer, args.global_batch_size, iteration, stop, lrs)
        iteration = stop
        saved = {"iteration": iteration, "opt_param_scheduler": sched.state_dict(),
                 "args": {"global_batch_size": args.global_batch_size}}
        torch.save(saved, ckpt)
    return lrs


def check_stage_resume(folder, work):
    """The exported launches resume through every stage change with the learning rate (and
    weight decay) of one uninterrupted run, for each decay style; the old advice (``--train-iters``
    = each stage's end) fails megatron-core's check. Returns a one-line summary."""
    launches = exported_launches(folder)
    doc = json.load(open(os.path.join(folder, "megatron_stages.json")))
    ranges = [(st["start_iteration"], st["end_iteration"]) for st in doc["stages"]]
    assert [(s, e) for s, e, _ in launches] == ranges, "megatron_stages.txt and .json disagree on the stages"
    assert len(launches) >= 2, "the check needs a stage change"
    ckpt = os.path.join(work, "megatron_sched.pt")
    worst, notes = 0.0, []
    for style, extra in USER_ARGS.items():
        user = shlex.split(extra)
        lrs = staged_run(launches, user, ckpt)
        args = parse_launch(launches[0][2] + user)
        ref_opt, ref = build_scheduler(args)  # the same run, never interrupted
        want = {}
        _run(ref, ref_opt, args.global_batch_size, 0, args.train_iters, want)
        assert sorted(lrs) == sorted(want) == list(range(1, args.train_iters + 1))
        diff = max(max(abs(a - b) for a, b in zip(lrs[i], want[i])) for i in want)
        if diff > TOL:
            raise AssertionError(f"{style}: staged learning rate differs from one run's by {diff:.3g}")
        if len({want[i][0] for i in want if i > launches[1][0]}) < 5:  # else the comparison proves little
            raise AssertionError(f"{style}: the learning rate barely changes after the stage change")
        if style == "cosine":  # the reference itself against the cosine schedule written out by hand
            g, peak, low = args.global_batch_size, args.lr, args.min_lr
            warm, total = args.lr_warmup_iters * g, args.train_iters * g
            for i, (lr, _) in want.items():
                s = i * g
                hand = (peak * s / warm if s <= warm else
                        low + 0.5 * (math.cos(math.pi * (s - warm) / (total - warm)) + 1) * (peak - low))
                assert abs(lr - hand) <= TOL, (i, lr, hand)
        worst = max(worst, diff)
        # The old advice: each stage launched with --train-iters = its own end, nothing else shared.
        old = [(s, e, ["--train-iters", str(e)] + argv[argv.index("--data-path"):]) for s, e, argv in launches]
        try:
            staged_run(old, user, ckpt)
        except AssertionError as exc:
            if not (str(exc).startswith("OptimizerParamScheduler:") and "do not match" in str(exc)):
                raise
            notes.append(f"{style}: {exc}")
        else:
            raise AssertionError(f"{style}: the old per-stage --train-iters advice resumed; the negative control failed")
    first = launches[1][0]
    return (f"stage-change resume of the LR scheduler (OptimizerParamScheduler, {len(launches)} launches, "
            f"resume at {first}, {len(USER_ARGS)} decay styles): lr and wd per iteration = one run's within "
            f"{worst:.1e}; old per-stage --train-iters: {notes[0]}")
