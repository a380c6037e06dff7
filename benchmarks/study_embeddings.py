"""Domain embeddings for the mixture-rules study (benchmarks/mixture_rules_study.py).

Trains one proxy per (corpus, proxy setting) on the uniform mixture, embeds every domain
(training split, per-window means kept for the split-domain experiment) and saves
``{out}/{corpus}/{setting}/embeddings.pt``. A finished setting is skipped on a rerun.

    python -m benchmarks.study_embeddings --corpus builtin --out runs/study
    python -m benchmarks.study_embeddings --corpus realtext=/work/evidence/corpus --out runs/study

Proxy settings: the ones ``chameleon compare`` uses at its default budget (tiny, 40 steps,
64-token blocks) and at 10x (tiny, 300 steps, 128-token blocks), and the ``train-proxy``
default (small, 1000 steps, 128-token blocks); ``--settings`` picks a subset.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

# name -> (preset, proxy steps, block size)
SETTINGS = {
    "tiny-40": ("tiny", 40, 64),
    "tiny-300": ("tiny", 300, 128),
    "small-1000": ("small", 1000, 128),
}
EMBED_WINDOWS = 128  # compare's default (CompareConfig().embed.n_windows)
TEST_FRACTION = 0.1  # as compare: the test split is never read here


def load_corpus(spec: str, cache_dir=None):
    """``(name, dataset)`` of ``builtin`` or ``NAME=FOLDER`` (token cache in ``cache_dir``)."""
    from chameleon_ext.data import builtin_dataset_path, load_dataset

    name, _, path = spec.partition("=")
    if name == "builtin" and not path:
        path = builtin_dataset_path()
    return name, load_dataset(path, tokenizer="byte", val_fraction=0.1, test_fraction=TEST_FRACTION,
                              cache_dir=cache_dir)


def embed_setting(ds, setting: str, folder: str, seed: int = 0) -> str:
    from chameleon_ext.embed import EmbedConfig, embed_domains
    from chameleon_ext.model import load_model
    from chameleon_ext.pipeline import train_proxy
    from chameleon_ext.trainer import TrainConfig

    path = os.path.join(folder, "embeddings.pt")
    if os.path.exists(path):
        return path
    preset, steps, block = SETTINGS[setting]
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    cfg = TrainConfig(steps=steps, batch_size=16, block_size=block, lr=3e-3, warmup_steps=min(30, steps // 4),
                      eval_every=0, ckpt_every=max(steps, 1), seed=seed, device="cpu",
                      out_dir=os.path.join(folder, "proxy"), quiet=True)
    model_path = train_proxy(ds, cfg.out_dir, preset=preset, block_size=block, config=cfg, seed=seed)
    proxy = load_model(model_path)
    emb = embed_domains(proxy, ds, EmbedConfig(n_windows=EMBED_WINDOWS, window=block, seed=seed), device="cpu",
                        cache_dir=os.path.join(folder, "cache"), windows=True)
    torch.save({"domains": emb.domains, "embeddings": emb.embeddings, "windows": emb.windows,
                "setting": setting, "preset": preset, "steps": steps, "block": block,
                "seconds": time.perf_counter() - t0}, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"{setting}: {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", action="append", required=True, help="builtin, or NAME=FOLDER")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default="runs/study")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for spec in args.corpus:
        name, ds = load_corpus(spec, os.path.join(args.out, spec.partition("=")[0], "tokens"))
        for setting in args.settings.split(","):
            embed_setting(ds, setting, os.path.join(args.out, name, setting))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
