"""``chameleon compare``: every mixture method on the same trainer and budget."""

from __future__ import annotations

import sys

from ..errors import ChameleonUserError
from .common import BUILTIN, name_list, say, train_fields
from .options import add_common, add_strict, add_training, config_option


def cmd_compare(args) -> int:
    """Every mixture method on the same trainer and token budget, several seeds, test split."""
    import shlex

    from ..compare import CompareConfig, run_compare
    from ..compare.config import compare_embed_config, compare_train_config
    from ..data import builtin_dataset_path, load_dataset

    new = name_list(args.new_domains)
    finetune = bool(args.finetune_from or args.finetune_data or args.finetune_domains)
    if new and finetune:
        raise ChameleonUserError("--new-domains and the finetuning options are separate scenarios; run them "
                                 "one at a time (into the same --out to share finished units)")
    cfg = CompareConfig(
        mixtures=name_list(args.mixtures), seeds=args.seeds, preset=args.preset,
        train=compare_train_config(**train_fields(args)), embed=compare_embed_config(n_windows=args.embed_windows),
        proxy_steps=args.proxy_steps, regmix_proxies=args.regmix_proxies, regmix_steps=args.regmix_steps,
        test_fraction=args.test_fraction, val_fraction=args.val_fraction,
        scenario="new_domains" if new else ("finetune" if finetune else "pretrain"), new_domains=new,
        finetune_domains=name_list(args.finetune_domains), finetune_from=args.finetune_from,
        finetune_data=args.finetune_data, finetune_steps=args.finetune_steps, strict=args.strict)
    # --finetune-data replaces --data: the finetuning domains are the whole dataset then
    path = args.finetune_data or (builtin_dataset_path() if args.data == BUILTIN else args.data)
    ds = load_dataset(path, tokenizer=args.tokenizer or "byte", cache_dir=args.cache_dir,
                      val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                      text_field=args.text_field)
    command = ("chameleon " + " ".join(shlex.quote(a) for a in sys.argv[1:])
               if "compare" in sys.argv[1:2] else None)
    report = (lambda *a: None) if args.quiet else say
    run_compare(ds, cfg, args.out, say=report, plots=not args.no_plots, command=command)
    return 0


def add_compare(p):
    from ..compare import METHODS, CompareConfig
    from ..compare.config import compare_embed_config, compare_train_config
    from ..embed import EmbedConfig

    add_common(p, defaults=compare_train_config)
    config_option(p, CompareConfig, "mixtures",
                  help=f"comma-separated methods ({', '.join(METHODS)}) or weights.json paths")
    config_option(p, CompareConfig, "seeds")
    p.add_argument("--out", default="runs/compare", help="output folder (a rerun skips finished units)")
    p.add_argument("--no-plots", action="store_true", help="do not draw compare.png")
    add_strict(p)
    # the base runs' training options, generated as for `chameleon train` with the comparison's defaults
    g = add_training(p, defaults=compare_train_config, preset=CompareConfig().preset, per_run=True)
    g.title = "training (defaults: about 15 minutes for everything on the built-in data, 2 CPU cores)"
    config_option(g, CompareConfig, "test_fraction")
    m = p.add_argument_group("mixtures")
    for name in ("proxy_steps", "regmix_proxies", "regmix_steps"):
        config_option(m, CompareConfig, name)
    config_option(m, EmbedConfig, "n_windows", "--embed-windows", defaults=compare_embed_config,
                  help="Chameleon embedding windows per domain")
    s = p.add_argument_group("scenarios")
    s.add_argument("--new-domains", default=None,
                   help="comma-separated domains the proxies do not see (Chameleon: transfer mode; DoReMi, RegMix: retrain)")
    s.add_argument("--finetune-from", default=None, help="model.pt/ckpt.pt to finetune")
    s.add_argument("--finetune-data", default=None, help="dataset folder of the finetuning domains (with --finetune-from)")
    s.add_argument("--finetune-domains", default=None,
                   help="comma-separated finetuning domains of --data (the others pretrain the base model)")
    config_option(s, CompareConfig, "finetune_steps")
    p.set_defaults(func=cmd_compare)
