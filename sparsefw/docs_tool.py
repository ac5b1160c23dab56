"""Documentation tool: generate the configuration and API references and check the guides' code
blocks.

``python -m sparsefw.docs_tool``          regenerate ``docs/configuration.md`` and ``docs/api.md``
                                         (:mod:`sparsefw.api_reference`);
``python -m sparsefw.docs_tool --check``  fail (exit 1) if either is out of date or any code
block of the guides (or the README's example) fails.

The reference is built from the attrs classes themselves: the core sections of
:mod:`sparsefw.config` and the config class of every built-in component, model and data set
(entry points are not loaded, so the page does not depend on what is installed). Each option's
type, default and allowed values come from the field, its description from the ``#:`` comment
above it in the source.

Code blocks of ``docs/**/*.md`` (the generated page excepted) are checked by their language:

* ``toml`` — parsed; a block that is a run config (no ``extends``) is also structured against
  the catalogue (built-ins plus the example plugin under ``examples/``), so unknown keys, bad
  values and misspelled component names fail;
* ``python`` — executed; the blocks of one page share a namespace and run in order;
* ``console`` — every ``$ command`` line runs (``sparsefw ...`` in this process, others with
  bash) and must exit with status 0; other lines are output and are not compared. ``pip``,
  ``tensorboard`` and ``torchrun`` commands are not run.

Python and console blocks run in a scratch directory where ``configs/`` and ``examples/`` of
the repository are visible, so relative paths work and outputs (``runs/``) vanish afterwards.
A block right after a ``<!-- docs: no-check -->`` line is not checked.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomllib

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REFERENCE = DOCS / "configuration.md"
API_REFERENCE = DOCS / "api.md"
NO_CHECK = "<!-- docs: no-check -->"
#: console commands that are shown but never run by the checker
SKIP_COMMANDS = ("pip", "python -m pip", "tensorboard", "torchrun", "cd ")


# ------------------------------------------------------------------------------ describing fields
def _closure(fn) -> dict[str, Any]:
    names = fn.__code__.co_freevars
    cells = fn.__closure__ or ()
    return {n: c.cell_contents for n, c in zip(names, cells, strict=False)}


def describe_validator(v: Any) -> str:
    """A short human text for an attrs validator (``in (0, 1]``, ``one of: a, b``, ``> 0``)."""
    if v is None:
        return ""
    inner = getattr(v, "_validators", None)
    if inner is not None:  # attrs.validators.and_
        parts = [describe_validator(x) for x in inner]
        return "; ".join(p for p in parts if p)
    if isinstance(v, (list, tuple)):
        return "; ".join(p for p in (describe_validator(x) for x in v) if p)
    qual = getattr(v, "__qualname__", "")
    if qual.startswith("in_range"):
        c = _closure(v)
        lo, hi = c.get("lo"), c.get("hi")
        lo_open, hi_open = c.get("lo_open", True), c.get("hi_open", False)
        if hi is None:
            return "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        if lo is None:
            return f"{'<' if hi_open else '<='} {hi}"
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if qual.startswith("each"):
        return f"each {describe_validator(_closure(v)['check'])}"
    if qual.startswith("one_of"):
        return "one of: " + ", ".join(f"`{x}`" for x in _closure(v).get("choices", ()))
    text = repr(v)
    m = re.match(r"<Validator for x (.+)>$", text)
    if m:
        return m.group(1)
    if "instance_of" in text or "optional" in text.lower():
        return ""
    name = getattr(v, "__name__", "")
    if name:
        return name.strip("_").replace("_", " ")
    return ""


def toml_value(value: Any) -> str:
    """``value`` written as TOML (``None``: shown as *unset*)."""
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if attrs.has(type(value)):
        return toml_value(attrs.asdict(value))
    return str(value)


def field_comments(cls: type) -> dict[str, str]:
    """``#:`` comments above each field, from the class and its attrs bases (nearest wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not attrs.has(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                comment = []
                i = node.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#:"):
                    comment.insert(0, lines[i].strip()[2:].strip())
                    i -= 1
                if comment:
                    out[node.target.id] = " ".join(comment)
    return out


def _type_text(field: attrs.Attribute) -> str:
    t = field.type
    if t is None:
        return ""
    if isinstance(t, str):
        text = t
    elif isinstance(t, type) and not getattr(t, "__args__", None):
        text = t.__name__  # a plain class (resolved annotations)
    else:
        text = str(t)  # generic aliases and unions: tuple[float, float], int | None
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field: attrs.Attribute) -> Any:
    d = field.default
    if d is attrs.NOTHING:
        return attrs.NOTHING
    if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
        return d.factory() if not d.takes_self else attrs.NOTHING
    return d


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(cls: type) -> str:
    """A Markdown table of ``cls``'s options (or a line saying it has none)."""
    fields = attrs.fields(cls)
    if not fields:
        return "No options."
    comments = field_comments(cls)
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for f in fields:
        default = _default(f)
        if default is attrs.NOTHING:
            dtext = "**required**"
        elif default is None:
            dtext = "*unset*"
        else:
            dtext = f"`{toml_value(default)}`"
        rows.append(f"| `{f.name}` | `{_cell(_type_text(f))}` | {_cell(dtext)} | "
                    f"{_cell(describe_validator(f.validator))} | "
                    f"{_cell(_md(comments.get(f.name) or CORE_NOTES.get((cls, f.name), '')))} |")
    return "\n".join(rows)


def _md(text: str) -> str:
    """reStructuredText literals (````x````) as Markdown code (```x```)."""
    return text.replace("``", "`")


def _doc_first(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return _md(doc.split("\n\n")[0].replace("\n", " ").strip())


def _core_notes() -> dict[tuple[type, str], str]:
    """Descriptions of core options whose fields carry no ``#:`` comment in the source."""
    from sparsefw import config as c

    notes = {
        c.TrainConfig: {
            "epochs": "epochs per round",
            "batch_size": "training batch (the global batch under DDP)",
            "eval_batch_size": "evaluation batch",
            "device": "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...",
            "amp": "autocast dtype for the forward/backward pass",
            "compile": "run the model through `torch.compile`",
            "channels_last": "channels-last memory format (convolutional models on GPU)",
            "num_workers": "DataLoader workers for file-based data sets",
            "log_every": "read train metrics to the host every this many steps",
            "out_dir": "parent of the run directory when `--run-dir` is not given",
            "name": "run directory stem (default: the config file's stem); other characters "
                    "than letters, digits and `._+-` become `_`, cut to 64, so the directory "
                    "stays inside `out_dir`",
        },
        c.OptimizerConfig: {
            "name": "optimizer", "lr": "base learning rate",
            "momentum": "SGD momentum", "nesterov": "SGD Nesterov momentum",
            "weight_decay": "L2 / decoupled weight decay", "betas": "AdamW betas",
            "eps": "AdamW epsilon",
            "implementation": "torch's update kernels: `auto` = `fused` where torch has them "
                              "for the device (CPU, CUDA), else `foreach`; fused SGD's update "
                              "is ~2.5x faster on CPU (benchmarks/RESULTS.md)",
        },
        c.LRScheduleConfig: {
            "name": "shape of the learning-rate multiplier",
            "warmup_epochs": "linear warm-up from 0, in epochs",
            "gamma": "`step`: factor at each milestone",
        },
        c.SparsityConfig: {
            "density": "global fraction of active weights over the sparsified layers",
            "distribution": "layer-wise allocation of the density",
            "kind": "`hard`: pruned weights are zero; `forward`: dense weights, masked forward",
            "compute": "masked Linear layers in training: `dense`; `sparse` kernels (CSR "
                       "forward, sampled weight gradient); `auto`: measured per layer (see "
                       "docs/speed.md)",
        },
        c.LoggingConfig: {"observers": "observer components, by name"},
    }
    return {(cls, k): v for cls, fields in notes.items() for k, v in fields.items()}


class _LazyNotes(dict):
    def get(self, key, default=None):
        if not self:
            self.update(_core_notes())
        return super().get(key, default)


CORE_NOTES = _LazyNotes()


# ------------------------------------------------------------------------------ the reference
_SLOT_SECTIONS = (
    ("dataset", "[data]", "The data set. `name` picks it; the rest are its options."),
    ("model", "[model]", "The network. `name` picks it; the rest are its options."),
    ("mask_init", "[mask_init]", "How the first masks are chosen (exactly one per run)."),
    ("topology_update", "[topology_update]",
     "How the mask changes during training (at most one per run). Every topology component "
     "has the update interval `every`/`start`/`end` of `sparsefw.state.UpdateInterval`."),
    ("gradient_correct", "[[gradient_correct]]",
     "Gradient corrections, applied in the order listed (an array of tables)."),
    ("perturb", "[[perturb]]", "Weight or input perturbations around the forward/backward "
                               "pass, in the order listed (an array of tables)."),
    ("schedule", "[[schedule]]", "Named values per step (`drop_fraction`, `rho`, ...) that "
                                 "other components read (an array of tables)."),
    ("observer", "[logging] observers", "Observers are listed by name in "
                                        "`[logging] observers`; they take no options."),
)


def generate_reference(catalogue=None) -> str:
    """The text of ``docs/configuration.md``."""
    from sparsefw import config as config_mod
    from sparsefw.plugins import load_catalogue

    catalogue = catalogue or load_catalogue(autoload=False)
    reg = catalogue.registry
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m sparsefw.docs_tool` from the attrs config classes. "
        "Do not edit by hand: `python -m sparsefw.docs_tool --check` fails when this page is "
        "out of date. -->",
        "",
        "A run is one TOML file. Every section is optional (defaults below); unknown keys are "
        "errors that list the valid ones. `extends = \"base.toml\"` merges a base file under "
        "this one (tables key by key), and `sparsefw train CONFIG --set section.key=value` "
        "overrides any value from the command line (arrays of tables by index: "
        "`--set perturb.0.rho=0.1`). Sections that select a component take a `name` plus that "
        "component's own options. Every float must be finite (NaN, `inf` and `1e400` are "
        "errors) and every integer must fit in 64 bits, in every section and component; all "
        "problems of a file are reported together (`sparsefw` exits with code 2). This page "
        "lists the built-in components; `sparsefw plugins` lists everything installed.",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
        "| `seed` | `int` | `0` | seeds the model, the data order and `state.generator` |",
        "| `extends` | `str` | *unset* | a base config, relative to this file's directory (`../base.toml` reaches up; absolute paths are refused) |",
        "",
    ]
    for section, cls in config_mod.PLAIN_SECTIONS.items():
        out += [f"## [{section}]", "", _doc_first(cls), "", options_table(cls), ""]
    for slot, header, intro in _SLOT_SECTIONS:
        entries = reg.by_slot().get(slot, [])
        out += [f"## {header}", "", intro, ""]
        default = config_mod.DEFAULTS.get({"dataset": "data"}.get(slot, slot))
        if default:
            out += [f"Default: `name = \"{default['name']}\"`.", ""]
        if not entries:
            out += ["(none registered)", ""]
            continue
        out += ["| name | summary | module |", "|---|---|---|"]
        out += [f"| [`{e.name}`](#{_anchor(slot, e.name)}) | {_cell(_md(e.summary))} | "
                f"`{e.module}` |"
                for e in entries]
        out.append("")
        if slot == "observer":
            continue
        for e in entries:
            out += [f'### {slot}: `{e.name}` <a id="{_anchor(slot, e.name)}"></a>', ""]
            if e.summary:
                out += [_md(e.summary), ""]
            out += [f"Options (`{e.config.__module__}.{e.config.__qualname__}`):", "",
                    options_table(e.config), ""]
    return "\n".join(out).rstrip() + "\n"


def _anchor(slot: str, name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{slot}-{name}".lower())


def reference_is_current(path: Path = REFERENCE) -> bool:
    return path.exists() and path.read_text() == generate_reference()


# ------------------------------------------------------------------------------ code blocks
@attrs.frozen
class Block:
    """A fenced code block of a Markdown page."""

    path: Path
    line: int
    lang: str
    text: str
    checked: bool = True

    @property
    def where(self) -> str:
        try:
            rel = self.path.relative_to(REPO)
        except ValueError:
            rel = self.path
        return f"{rel}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)(.*)$")


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its language and first line number."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(x[len(indent):] if x.startswith(indent) else x
                         for x in lines[start:j])
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        blocks.append(Block(path, start, lang, body, checked=prev != NO_CHECK))
        i = j + 1
    return blocks


def guide_pages(docs: Path = DOCS) -> list[Path]:
    """The Markdown pages whose blocks are checked (all of ``docs/`` but the generated ones)."""
    generated = {REFERENCE.resolve(), API_REFERENCE.resolve()}
    return sorted(p for p in docs.rglob("*.md") if p.resolve() not in generated)


_CHECK_CATALOGUE = None


def _check_catalogue():
    """Built-ins plus the example plugin(s) under ``examples/`` (importable from their src)."""
    global _CHECK_CATALOGUE
    if _CHECK_CATALOGUE is None:
        import importlib

        from sparsefw.plugins import load_catalogue

        extra = []
        for src in sorted((REPO / "examples").glob("*/src")):
            for pkg in sorted(p for p in src.iterdir() if (p / "plugin.py").exists()):
                if str(src) not in sys.path:
                    sys.path.insert(0, str(src))
                extra.append((pkg.name, importlib.import_module(f"{pkg.name}.plugin")))
        _CHECK_CATALOGUE = load_catalogue(autoload=False, extra=extra)
    return _CHECK_CATALOGUE


def check_toml(block: Block) -> None:
    """Parse; a run config without ``extends`` is also structured against the catalogue."""
    from sparsefw import config as config_mod

    data = tomllib.loads(block.text)
    if "extends" in data or not set(data) <= set(config_mod.TOP_LEVEL):
        return  # a fragment of something else (pyproject.toml, a base-extending config)
    config_mod.structure(data, _check_catalogue().registry, source=block.where)


@contextlib.contextmanager
def scratch_dir():
    """A temporary working directory where ``configs/`` and ``examples/`` are visible."""
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="sparsefw-docs-") as tmp:
        for name in ("configs", "examples"):
            if (REPO / name).exists():
                os.symlink(REPO / name, Path(tmp) / name)
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def run_python(block: Block, namespace: dict) -> None:
    code = compile(block.text, block.where, "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)  # noqa: S102 - running the documentation is the point


def console_commands(text: str) -> list[str]:
    """The ``$ ...`` lines of a console block (a trailing ``\\`` continues a command)."""
    cmds: list[str] = []
    cont = False
    for line in text.splitlines():
        s = line.strip()
        if cont:
            cmds[-1] = cmds[-1][:-1].rstrip() + " " + s
        elif s.startswith("$ "):
            cmds.append(s[2:].strip())
        else:
            continue
        cont = cmds[-1].endswith("\\")
    return cmds


def run_console(block: Block) -> None:
    from sparsefw import cli

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for cmd in console_commands(block.text):
        if cmd.startswith(SKIP_COMMANDS):
            continue
        argv = shlex.split(cmd)
        if argv and argv[0] == "sparsefw" and not any(c in cmd for c in "|;&><"):
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    rc = cli.main(argv[1:])
            except SystemExit as exc:  # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 1
            if rc:
                raise RuntimeError(f"`{cmd}` exited with {rc}:\n{buf.getvalue()[-2000:]}")
            continue
        proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode:
            raise RuntimeError(f"`{cmd}` exited with {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-2000:]}")


def check_pages(pages: Iterable[Path], *, langs: Sequence[str] = ("toml", "python", "console"),
                echo=print) -> list[str]:
    """Check every block of ``pages``; returns one problem text per failing block."""
    problems = []
    for page in [Path(p).resolve() for p in pages]:
        namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
        with scratch_dir():
            for block in code_blocks(page):
                if block.lang not in langs or not block.checked:
                    continue
                try:
                    if block.lang == "toml":
                        check_toml(block)
                    elif block.lang == "python":
                        run_python(block, namespace)
                    else:
                        run_console(block)
                except Exception as exc:
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    problems.append(f"{block.where}: {block.lang} block failed: {detail}")
                    echo(f"FAIL {block.where} ({block.lang})")
                else:
                    echo(f"ok   {block.where} ({block.lang})")
    return problems


# ------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsefw.docs_tool",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write: fail if the reference is stale or a block fails")
    parser.add_argument("--no-run", action="store_true",
                        help="with --check: only the reference and the TOML blocks")
    parser.add_argument("pages", nargs="*", type=Path,
                        help="pages to check (default: every page of docs/)")
    args = parser.parse_args(argv)
    from sparsefw import api_reference

    generated = {REFERENCE: generate_reference(), API_REFERENCE: api_reference.generate()}
    if not args.check:
        for path, text in generated.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    problems = []
    for path, text in generated.items():
        if not path.exists() or path.read_text() != text:
            problems.append(f"{path.relative_to(REPO)} is out of date: run "
                            "`python -m sparsefw.docs_tool` and commit the result")
    langs = ("toml",) if args.no_run else ("toml", "python", "console")
    pages = [p.resolve() for p in args.pages] or guide_pages()
    problems += check_pages(pages, langs=langs)
    if not args.pages and "python" in langs:  # the README's example runs as written
        problems += check_pages([REPO / "README.md"], langs=("python",))
    for p in problems:
        print(f"docs: {p}", file=sys.stderr)
    print(f"docs: {len(problems)} problem(s)" if problems else "docs: all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
