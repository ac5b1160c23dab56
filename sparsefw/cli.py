"""The ``sparsefw`` command: ``train``, ``plugins`` and ``describe``, plus one sub-command per
module of :mod:`sparsefw.commands` (each defines ``register(subparsers)``).

Start-up is kept short: this module and the command modules import neither torch nor the
plugins at the top; each command imports what it uses when it runs, so ``sparsefw --help``
and ``sparsefw compare`` never load torch.

Exit codes: 0 done; 1 a file could not be written (disk full, read-only, …) or a plugin broke
the hook contract under ``[debug] check_plugins``; 2 bad input (a
config, a run directory, a checkpoint: the message says which file and what); 3 training
diverged (non-finite loss, gradient or weights; the last good checkpoint is kept)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path


def _load(args, catalogue):
    from sparsefw import config as config_mod
    from sparsefw.config import ConfigError

    if args.config is None:
        raise ConfigError(["a CONFIG file is required (or --resume RUN_DIR)"])
    cfg, raw = config_mod.load(args.config, catalogue.registry, args.set or ())
    return cfg, raw


def cmd_train(args) -> int:
    from sparsefw import config as config_mod
    from sparsefw.engine import train
    from sparsefw.engine.rundir import (
        RUN_INFO,
        RunDirError,
        claim,
        read_run_info,
        resume_differences,
    )
    from sparsefw.plugins import load_catalogue

    catalogue = load_catalogue()
    if args.resume:
        if args.run_dir is not None:
            raise RunDirError("--resume RUN_DIR continues the run in RUN_DIR: --run-dir is "
                              "not taken with it")
        info = read_run_info(args.resume)
        raw, source = info["raw_config"], str(Path(args.resume) / RUN_INFO)
        differences = []
        if args.config is not None:
            _, given = _load(args, catalogue)
            if given != raw:
                differences.append(f"{args.config} (with --set) differs from the run's "
                                   f"recorded config")
                if args.force:
                    raw, source = given, args.config
        cfg = config_mod.structure(raw, catalogue.registry, source=source)
        differences += resume_differences(info, cfg, catalogue)
        if differences and not args.force:
            raise RunDirError("\n".join(
                [f"--resume {args.resume}: refusing to continue a run whose code or config "
                 f"changed (it would not reproduce the run; --force continues anyway):",
                 *(f"  - {d}" for d in differences)]))
        for d in differences:
            print(f"sparsefw: warning: --force: {d}", file=sys.stderr)
    else:
        cfg, raw = _load(args, catalogue)
        source = args.config
        if args.run_dir is not None:
            claim(args.run_dir)
    trainer, metrics = train(cfg, catalogue, run_dir=args.run_dir, raw_config=raw,
                             resume=args.resume, config_source=source,
                             trust_checkpoint=args.trust_checkpoint)
    if trainer.dist.is_main:  # (under torchrun, once: every rank holds the same run)
        print(f"run directory: {trainer.run_dir}")
        print(f"final test accuracy: {metrics['test/acc']:.4f}  (density "
              f"{metrics['density']:.4f}, {trainer.state.step} steps)")
    return 0


def cmd_plugins(args) -> int:
    import warnings

    from sparsefw.plugins import load_catalogue
    from sparsefw.registry import PluginLoadWarning

    with warnings.catch_warnings():  # reported once, below
        warnings.simplefilter("ignore", PluginLoadWarning)
        catalogue = load_catalogue()
    reg = catalogue.registry
    if args.name:
        return _describe_component(reg, args.name)
    for slot, entries in reg.by_slot().items():
        if not entries:
            continue
        print(f"{slot}:")
        width = max(len(e.name) for e in entries)
        for e in entries:
            src = f"{e.source} {e.version}".strip()
            print(f"  {e.name:<{width}}  [{src}]  {e.summary}")
    for (slot, name), sources in sorted(reg.clashes.items()):
        print(f"warning: {slot} {name!r} is registered by several plugins ({'; '.join(sources)});"
              f" select it by a qualified name", file=sys.stderr)
    problems = [*catalogue.failures, *(f"sparsefw: rejected {why}" for why in
                                       reg.rejected.values())]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _describe_component(reg, name: str) -> int:
    """``sparsefw plugins NAME``: every component called NAME (or ``dist:NAME``), with its
    source, documentation and options table."""
    import inspect

    from sparsefw.docs_tool import options_table

    found = [e for (slot, n), e in sorted(reg.entries.items()) if n == name]
    found += [e for (slot, q), e in sorted(reg.qualified.items())
              if q == name and e not in found]
    rejected = [why for (slot, n), why in reg.rejected.items() if n == name]
    for why in rejected:
        print(f"error: rejected {why}", file=sys.stderr)
    if not found:
        if not rejected:
            names = sorted({n for (_, n) in reg.entries})
            print(f"sparsefw: no component named {name!r}; components: {', '.join(names)}",
                  file=sys.stderr)
        return 1
    for e in found:
        print(f"{e.slot} {e.name}  [{e.source} {e.version}]".rstrip("] ") + "]")
        print(f"  {e.module}.{getattr(e.factory, '__qualname__', e.factory)}")
        module_doc = inspect.getdoc(sys.modules.get(e.module)) or ""
        doc = module_doc or inspect.getdoc(e.factory) or e.summary
        print()
        print("\n".join(f"  {line}" if line else "" for line in doc.splitlines()))
        print()
        print(options_table(e.config))
        print()
    return 1 if rejected else 0


def cmd_describe(args) -> int:
    from sparsefw import config as config_mod
    from sparsefw.plugins import build_run, load_catalogue

    catalogue = load_catalogue()
    cfg, _ = _load(args, catalogue)
    run = build_run(cfg, catalogue)
    print("# resolved configuration")
    print(json.dumps(config_mod.to_dict(cfg), indent=2))
    print("\n# components")
    for comp in run.components:
        entry = catalogue.registry.get(comp.slot, comp.name)
        print(f"  {comp.key:<32} {entry.source} {entry.version}")
    print("\n# call plan (hook: components in call order)")
    for hook, keys in run.call_plan().items():
        print(f"  {hook:<28} {', '.join(keys) if keys else '-'}")
    print("\n# schedule values (value: produced by -> read by)")
    for line in run.value_flow():
        print(f"  {line}")
    from sparsefw import distributions, initialisation

    sp = cfg.sparsity
    print("\n# sparsity")
    print(f"  allocation  {distributions.convention(sp.distribution, sp.er_kernel)}")
    print(f"  init        {initialisation.DESCRIPTIONS[sp.init]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sparsefw import __version__
    from sparsefw.commands import TRUST_HELP

    parser = argparse.ArgumentParser(prog="sparsefw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sparsefw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config", nargs="?", help="TOML config file")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--run-dir", help="write the run here instead of out_dir/<name>-<time> "
                                     "(a new or empty directory)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the config, the sparsefw revision "
                        "or a component's version differs from the run's")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plugins", help="list every component by slot with its source; with "
                                       "NAME, that component's documentation and options")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a component name (or distribution:name)")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("describe", help="show the resolved config and the hook call plan")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_describe)
    import sparsefw.commands as commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"sparsefw.commands.{mod}").register(sub)
    return parser


def _exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected failure (see the module docstring), ``None`` for a bug.
    The exception classes are imported here, when one is raised: ``--help`` loads no torch."""
    from sparsefw.config import ConfigError
    from sparsefw.engine.checkpoint import CheckpointError, CheckpointWriteError
    from sparsefw.engine.guard import Diverged
    from sparsefw.engine.rundir import RunDirError
    from sparsefw.plugin_checks import PluginCheckError

    if isinstance(exc, (ConfigError, RunDirError, CheckpointError, FileNotFoundError)):
        return 2
    if isinstance(exc, Diverged):
        return 3
    if isinstance(exc, (PluginCheckError, CheckpointWriteError, OSError)):
        return 1  # a plugin broke its contract; disk full, read-only, file-size limit
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        print(f"sparsefw: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
