"""The ``sparsefw`` command: ``train``, ``plugins`` and ``describe``, plus one sub-command per
module of :mod:`sparsefw.commands` (each defines ``register(subparsers)``).

Start-up is kept short: this module and the command modules import neither torch nor the
plugins at the top; each command imports what it uses when it runs, so ``sparsefw --help``
and ``sparsefw compare`` never load torch."""

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
    from sparsefw.config import ConfigError
    from sparsefw.engine import train
    from sparsefw.engine.rundir import RUN_INFO
    from sparsefw.plugins import load_catalogue

    catalogue = load_catalogue()
    if args.resume:
        info_path = Path(args.resume) / RUN_INFO
        if not info_path.exists():
            raise ConfigError([f"--resume {args.resume}: no {RUN_INFO} in that directory"])
        raw = json.loads(info_path.read_text())["raw_config"]
        if args.config is not None:
            _, given = _load(args, catalogue)
            if given != raw:
                raise ConfigError([f"--resume {args.resume}: {args.config} (with --set) differs "
                                   f"from the run's recorded config; resume with no CONFIG"])
        cfg = config_mod.structure(raw, catalogue.registry, source=str(info_path))
        source = str(info_path)
    else:
        cfg, raw = _load(args, catalogue)
        source = args.config
    trainer, metrics = train(cfg, catalogue, run_dir=args.run_dir, raw_config=raw,
                             resume=args.resume, config_source=source)
    print(f"run directory: {trainer.run_dir}")
    print(f"final test accuracy: {metrics['test/acc']:.4f}  (density {metrics['density']:.4f}, "
          f"{trainer.state.step} steps)")
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

    parser = argparse.ArgumentParser(prog="sparsefw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sparsefw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config", nargs="?", help="TOML config file")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--run-dir", help="write the run here instead of out_dir/<name>-<time>")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparsefw.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"sparsefw: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"sparsefw: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from sparsefw.plugin_checks import PluginCheckError

        if not isinstance(e, PluginCheckError):
            raise
        print(f"sparsefw: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
