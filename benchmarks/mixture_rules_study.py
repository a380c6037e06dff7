"""Which rule turns leverage scores into mixture weights: the study behind the default
(docs/method.md, "Rules"). Reads the embeddings benchmarks/study_embeddings.py wrote.

    python -m benchmarks.study_embeddings --corpus builtin --corpus realtext=/work/evidence/corpus --out runs/study
    python -m benchmarks.mixture_rules_study --study runs/study --out runs/study/report.md [--validate] \
        [--validate-finetune] [--corpus realtext=/work/evidence/corpus]

For every corpus x proxy setting x candidate rule it reports
  * the largest weight (the collapse test: the default must stay <= 0.9 everywhere);
  * the split-domain test: each domain j in turn is replaced by two near-identical halves (its
    windows split into even and odd ones, each half's mean a domain); the pair's total weight
    over j's original weight is the redundancy reward (1.0: none; the inverse-leverage rules
    reward a duplicated domain, because each copy explains the other);
  * sensitivity curves: the largest weight against each rule's parameter;
  * with ``--validate``: average VALIDATION perplexity of small base models trained on each
    candidate mixture (the test split is never read; ``chameleon compare`` reports test);
  * with ``--validate-finetune``: the finetuning rules the same way (a start model trained on
    the other domains, then finetuning runs from it on each candidate mixture).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import time

import torch

from chameleon_ext.weights import weights_from_embeddings

# label -> weights_from_embeddings keywords
CANDIDATES = {
    "paper": {"rule": "paper"},
    "paper + auto lambda": {"rule": "paper", "lam": "auto"},
    "paper + auto lambda + smoothing 0.2": {"rule": "paper", "lam": "auto", "smoothing": 0.2},
    "calibrated ratio 10": {"rule": "calibrated"},
    "power T=1": {"rule": "power", "temperature": 1.0, "smoothing": 0.0},
    "power T=2": {"rule": "power", "temperature": 2.0, "smoothing": 0.0},
    "power T=1 + smoothing 0.2": {"rule": "power", "temperature": 1.0, "smoothing": 0.2},
    "power T=2 + smoothing 0.2": {"rule": "power", "temperature": 2.0, "smoothing": 0.2},
    # the same toward the natural mixture (token shares of the training split) instead of uniform
    "power T=2 + smoothing 0.2 to natural": {"rule": "power", "temperature": 2.0, "smoothing": 0.2,
                                              "prior": "natural"},
}
SENSITIVITY = {
    "power: T": ("temperature", [0.25, 0.5, 1.0, 2.0, 4.0], {"rule": "power", "smoothing": 0.0}),
    "power + smoothing: c": ("smoothing", [0.0, 0.1, 0.2, 0.3, 0.5], {"rule": "power"}),
    "power + smoothing 0.2: share": ("share", [0.1, 0.25, 0.5, 0.75], {"rule": "power"}),
    "paper rule: lambda": ("lam", [0.01, 0.1, 1.0, 10.0, 100.0], {"rule": "paper"}),
    "paper + auto lambda: share": ("share", [0.1, 0.25, 0.5, 0.75], {"rule": "paper", "lam": "auto"}),
    "calibrated: ratio": ("ratio", [3.0, 10.0, 30.0, 100.0], {"rule": "calibrated"}),
}


def load_all(study: str):
    """``{(corpus, setting): record}`` of every embeddings.pt under ``study``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(study, "*", "*", "embeddings.pt"))):
        corpus, setting = path.split(os.sep)[-3:-1]
        out[(corpus, setting)] = torch.load(path, weights_only=False)
    return out


def weights(X, mode="pretrain", **kw):
    return weights_from_embeddings(X, mode=mode, **kw).weights


def resolve(kw, rec, split=None):
    """``kw`` with ``prior="natural"`` replaced by the corpus's token shares (after splitting
    domain ``split`` into two halves, each half has half its tokens)."""
    if kw.get("prior") != "natural":
        return kw
    p = list(rec["natural"])
    if split is not None:
        half = p.pop(split) / 2.0
        p += [half, half]
    return {**kw, "prior": p}


def natural_shares(spec: str, domains, tokens_dir: str):
    from benchmarks.study_embeddings import load_corpus

    _, ds = load_corpus(spec, tokens_dir)
    counts = [ds.n_tokens(d, "train") for d in domains]
    return [c / sum(counts) for c in counts]


def split_growth(rec, kw, mode="pretrain"):
    """Per domain j: (pair's total weight after splitting j into its even/odd windows) / (j's weight)."""
    W = [w.double() for w in rec["windows"]]
    X = torch.stack([w.mean(0) for w in W])
    base = weights(X, mode, **resolve(kw, rec))
    growth = []
    for j in range(len(W)):
        halves = torch.stack([W[j][0::2].mean(0), W[j][1::2].mean(0)])
        Xs = torch.cat([X[:j], X[j + 1:], halves])
        ws = weights(Xs, mode, **resolve(kw, rec, split=j))
        growth.append(float(ws[-2:].sum() / base[j]))
    return growth


def fmt_w(w):
    return " ".join(f"{v:.3f}" for v in w.tolist())


def validate(corpora, records, candidates, seeds=(0, 1), steps=60, cache_path=None, work="runs/study/validate"):
    """Average validation perplexity of a tiny base model per candidate mixture (compare's default
    budget: tiny preset, 64-token blocks, batch 16), mixtures from the tiny-40 proxy."""
    from benchmarks.study_embeddings import load_corpus
    from chameleon_ext.evaluation import evaluate
    from chameleon_ext.model import GPT, GPTConfig
    from chameleon_ext.trainer import TrainConfig, train

    import json

    done = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            done = json.load(f)  # "corpus|label" -> per-seed perplexities of an earlier run
    rows = {}
    for corpus, spec in corpora.items():
        rec = records.get((corpus, "tiny-40"))
        if rec is None:
            continue
        spec = spec if spec == "builtin" else f"{corpus}={spec}"
        _, ds = load_corpus(spec, os.path.join(os.path.dirname(os.path.dirname(rec["_path"])), "tokens"))
        X = torch.stack([w.double().mean(0) for w in rec["windows"]])
        mixes = {"uniform": "uniform"}
        for label in candidates:
            mixes[label] = dict(zip(rec["domains"], weights(X, **resolve(CANDIDATES[label], rec)).tolist()))
        for label, mix in mixes.items():
            if f"{corpus}|{label}" in done:
                ppl = done[f"{corpus}|{label}"]
                rows[(corpus, label)] = (sum(ppl) / len(ppl), ppl)
                continue
            ppl = []
            for seed in seeds:
                out = os.path.join(work, corpus, re.sub(r"[^A-Za-z0-9]+", "-", label), str(seed))
                cfg = TrainConfig(steps=steps, batch_size=16, block_size=64, lr=3e-3, warmup_steps=10, eval_every=0,
                                  ckpt_every=steps, seed=seed, device="cpu", out_dir=out, quiet=True, log_every=steps)
                model = GPT(GPTConfig.preset("tiny", ds.vocab_size, 64), seed=seed)
                train(model, ds, mix, cfg, resume=False)
                ev = evaluate(model, ds, 32, 64, seed=0, device="cpu", split="val")
                ppl.append(ev["average"]["mean_ppl"])
            rows[(corpus, label)] = (sum(ppl) / len(ppl), ppl)
            done[f"{corpus}|{label}"] = ppl
            if cache_path:
                with open(cache_path, "w") as f:
                    json.dump(done, f, indent=1)
            print(f"validate {corpus} {label}: {rows[(corpus, label)][0]:.3f} {ppl}", flush=True)
    return rows


FINETUNE_DOMAINS = {"builtin": ["math", "code", "web"], "realtext": ["python", "c_headers", "manpages"]}
FINETUNE_CANDIDATES = {
    "paper": {"rule": "paper"},
    "calibrated ratio 10": {"rule": "calibrated"},
    "power T=1 + smoothing 0.2 (default)": {"rule": "power", "temperature": 1.0, "smoothing": 0.2},
    "power T=0.5 + smoothing 0.2": {"rule": "power", "temperature": 0.5, "smoothing": 0.2},
}


def validate_finetune(corpora, work, seeds=(0, 1), start_steps=60, steps=40):
    """The finetuning rules on VALIDATION data: a tiny start model trained on the other domains
    (uniform), the finetuning domains embedded with it as the frozen proxy (as `compare` does),
    then `steps` finetuning steps per mixture and seed; mean validation perplexity over the
    finetuning domains."""
    from benchmarks.study_embeddings import load_corpus
    from chameleon_ext.compare import DatasetView
    from chameleon_ext.embed import EmbedConfig, embed_domains
    from chameleon_ext.evaluation import evaluate
    from chameleon_ext.model import GPT, GPTConfig
    from chameleon_ext.trainer import TrainConfig, train

    def cfg(out, n, seed):
        return TrainConfig(steps=n, batch_size=16, block_size=64, lr=3e-3, warmup_steps=min(10, n - 1), eval_every=0,
                           ckpt_every=n, seed=seed, device="cpu", out_dir=out, quiet=True, log_every=n)

    rows = {}
    for corpus, spec in corpora.items():
        fdoms = FINETUNE_DOMAINS.get(corpus)
        if not fdoms:
            continue
        spec = spec if spec == "builtin" else f"{corpus}={spec}"
        _, ds = load_corpus(spec, os.path.join(work, "..", corpus, "tokens"))
        pre = DatasetView(ds, [d for d in ds.domains if d not in fdoms])
        fview = DatasetView(ds, fdoms)
        folder = os.path.join(work, "finetune", corpus)
        start = GPT(GPTConfig.preset("tiny", ds.vocab_size, 64), seed=0)
        train(start, pre, "uniform", cfg(os.path.join(folder, "start"), start_steps, 0), resume=False)
        start_path = os.path.join(folder, "start", "model.pt")
        emb = embed_domains(start, fview, EmbedConfig(n_windows=128, window=64, seed=0), device="cpu")
        mixes = {"uniform": "uniform"}
        for label, kw in FINETUNE_CANDIDATES.items():
            mixes[label] = dict(zip(emb.domains, weights(emb.embeddings, "finetune", **kw).tolist()))
        for label, mix in mixes.items():
            ppl = []
            for seed in seeds:
                out = os.path.join(folder, re.sub(r"[^A-Za-z0-9]+", "-", label), str(seed))
                model = GPT(GPTConfig.preset("tiny", ds.vocab_size, 64), seed=seed)
                train(model, fview, mix, cfg(out, steps, seed), resume=False, init_from=start_path)
                ev = evaluate(model, fview, 32, 64, seed=0, device="cpu", split="val")
                ppl.append(ev["average"]["mean_ppl"])
            top = max(mix.values()) if isinstance(mix, dict) else 1.0 / len(fdoms)
            rows[(corpus, label)] = (sum(ppl) / len(ppl), ppl, top)
            print(f"finetune {corpus} {label}: {rows[(corpus, label)][0]:.3f} {ppl} max weight {top:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="runs/study")
    p.add_argument("--out", default=None, help="write the report (markdown) here too")
    p.add_argument("--validate", action="store_true")
    p.add_argument("--validate-finetune", action="store_true",
                   help="also the finetuning rules on validation data (start model + finetuning runs)")
    p.add_argument("--corpus", action="append", default=[], help="NAME=FOLDER of a corpus to validate on")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    records = load_all(args.study)
    specs = {"builtin": "builtin", **{c.split("=", 1)[0]: c for c in args.corpus}}
    shares = {}
    for key, rec in records.items():
        rec["_path"] = os.path.join(args.study, key[0], key[1], "embeddings.pt")
        if key[0] in specs:
            if key[0] not in shares:
                shares[key[0]] = natural_shares(specs[key[0]], rec["domains"], os.path.join(args.study, key[0], "tokens"))
            rec["natural"] = shares[key[0]]
    lines = ["# Mixture rules study", ""]

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    for corpus, p in shares.items():
        say(f"natural token shares of {corpus}: " + ", ".join(f"{v:.3f}" for v in p))
    say("")
    say("## Largest weight (pretraining) and split-domain growth per corpus x proxy")
    say("")
    say("growth = pair total / original weight when one domain is split into two near-identical halves "
        "(max and median over the domains); uniform weights give 2k/(k+1) (1.75 for k = 7, 1.78 for k = 8).")
    say("")
    say("| corpus | proxy | rule | max weight | weights | split growth max | median |")
    say("|---|---|---|---:|---|---:|---:|")
    worst = {}
    for (corpus, setting), rec in records.items():
        X = torch.stack([w.double().mean(0) for w in rec["windows"]])
        for label, kw in CANDIDATES.items():
            if kw.get("prior") == "natural" and "natural" not in rec:
                continue
            w = weights(X, **resolve(kw, rec))
            g = split_growth(rec, kw)
            worst[label] = max(worst.get(label, 0.0), float(w.max()))
            say(f"| {corpus} | {setting} | {label} | {float(w.max()):.3f} | {fmt_w(w)} | {max(g):.2f} | "
                f"{sorted(g)[len(g) // 2]:.2f} |")
    say("")
    say("Largest weight over every corpus and proxy: " + ", ".join(f"{k}: {v:.3f}" for k, v in worst.items()))
    say("")
    say("## Finetuning rules (largest weight, split growth)")
    say("")
    say("| corpus | proxy | rule | max weight | weights | split growth max | median |")
    say("|---|---|---|---:|---|---:|---:|")
    for (corpus, setting), rec in records.items():
        X = torch.stack([w.double().mean(0) for w in rec["windows"]])
        for label in ("paper", "power T=1 + smoothing 0.2"):
            kw = CANDIDATES[label]
            w = weights(X, "finetune", **kw)
            g = split_growth(rec, kw, "finetune")
            say(f"| {corpus} | {setting} | {label} | {float(w.max()):.3f} | {fmt_w(w)} | {max(g):.2f} | "
                f"{sorted(g)[len(g) // 2]:.2f} |")
    say("")
    say("## Sensitivity: largest weight (pretraining) against each rule's parameter")
    say("")
    for name, (param, values, base) in SENSITIVITY.items():
        say(f"{name}")
        say("")
        say("| corpus | proxy | " + " | ".join(f"{param}={v:g}" for v in values) + " |")
        say("|---|---|" + "---:|" * len(values))
        for (corpus, setting), rec in records.items():
            X = torch.stack([w.double().mean(0) for w in rec["windows"]])
            cells = [f"{float(weights(X, **{**base, param: v}).max()):.3f}" for v in values]
            say(f"| {corpus} | {setting} | " + " | ".join(cells) + " |")
        say("")
    t0 = time.perf_counter()
    if args.validate:
        corpora = {"builtin": "builtin", **dict(c.split("=", 1) for c in args.corpus)}
        rows = validate(corpora, records, list(CANDIDATES), cache_path=os.path.join(args.study, "validation.json"),
                        work=os.path.join(args.study, "validate"))
        say("## Validation perplexity (tiny base model, 60 steps, 2 seeds; mixtures from the tiny-40 proxy)")
        say("")
        say("| corpus | mixture | mean val ppl | per seed |")
        say("|---|---|---:|---|")
        for (corpus, label), (mean, per) in rows.items():
            say(f"| {corpus} | {label} | {mean:.3f} | {', '.join(f'{v:.3f}' for v in per)} |")
        say(f"\n(validation took {time.perf_counter() - t0:.0f} s)")
    if args.validate_finetune:
        corpora = {"builtin": "builtin", **dict(c.split("=", 1) for c in args.corpus)}
        rows = validate_finetune(corpora, os.path.join(args.study, "validate"))
        say("## Finetuning rules on validation data (tiny start model 60 steps on the other domains, "
            "40 finetuning steps, 2 seeds)")
        say("")
        say("| corpus | finetuning domains | mixture | mean val ppl | per seed | max weight |")
        say("|---|---|---|---:|---|---:|")
        for (corpus, label), (mean, per, top) in rows.items():
            say(f"| {corpus} | {', '.join(FINETUNE_DOMAINS[corpus])} | {label} | {mean:.3f} | "
                f"{', '.join(f'{v:.3f}' for v in per)} | {top:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
