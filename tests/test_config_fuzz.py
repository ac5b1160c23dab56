"""Bad-config fuzzing: mutations of every shipped config in ``configs/`` — wrong types, NaN,
infinities, huge and negative numbers, unknown keys and sections, misspelled names, malformed
TOML, broken ``extends`` and junk ``--set`` — all end in a :class:`ConfigError` that the CLI
reports with exit code 2, never in a traceback. Runs through validation only (``sparsefw
describe``), no training.

``SPARSEFW_FUZZ_KINDS=FILE`` appends the distinct kinds of error message seen to ``FILE``."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsefw import cli, config
from sparsefw import plugins as plugins_mod
from sparsefw.config import ConfigError
from sparsefw.plugins import load_catalogue

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.toml"))
#: options documented to take negative numbers (AGENT's τ is a regression coefficient)
NEGATIVE_OK = {"tau_init"}
#: at least this many examples in CI; the nightly tox environment runs more
EXAMPLES = int(os.environ.get("SPARSEFW_FUZZ_EXAMPLES", "200"))
KINDS: set[str] = set()


def _leaves(node, path=()):
    """(key path, value) of every scalar or plain array; arrays of tables by index."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, str(i)))
    else:
        yield path, node


CATALOGUE = load_catalogue(autoload=False)
RAW = {name: config.read_toml(CONFIGS / name) for name in SHIPPED}
LEAVES = [(name, path, value) for name in SHIPPED for path, value in _leaves(RAW[name])
          if path != ("extends",)]
SECTIONS = [(name, path[:-1]) for name, path, _ in LEAVES if len(path) > 1]
#: every option name of every config class, to tell a misspelling from another valid key
VALID_KEYS = {a.name for cls in (*config.PLAIN_SECTIONS.values(),
                                 *(e.config for e in CATALOGUE.registry.entries.values()))
              if attrs.has(cls) for a in attrs.fields(cls)} | set(config.TOP_LEVEL) | {"name"}
VALID_NAMES = {name for _slot, name in CATALOGUE.registry.entries}


def _toml(value) -> str:
    return value if isinstance(value, str) else repr(value)


def _wrong_type(value) -> st.SearchStrategy[str]:
    if isinstance(value, bool):
        return st.sampled_from(['"yes"', "1", "[true]"])
    if isinstance(value, (int, float)):
        return st.sampled_from(['"3"', "true", "[1]", "{ a = 1 }", '"nan"'])
    if isinstance(value, str):
        return st.sampled_from(["1", "2.5", "true", "[1, 2]", "{ a = 1 }"])
    return st.sampled_from(['"x"', "7", "{ a = 1 }", "[[1], [2]]"])  # arrays


@st.composite
def value_mutation(draw):
    """One ``--set`` that breaks one option of one shipped config."""
    name, path, value = draw(st.sampled_from(LEAVES))
    key = ".".join(path)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = ["wrong type"] + (["non-finite", "huge"] if numeric else [])
    if numeric and path[-1] not in NEGATIVE_OK:
        kinds.append("negative")
    if path[-1] == "name" and path[0] in config.COMPONENT_SECTIONS:
        kinds.append("misspelled name")
    kind = draw(st.sampled_from(kinds))
    if kind == "wrong type":
        new = draw(_wrong_type(value))
    elif kind == "non-finite":
        new = draw(st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400"]))
    elif kind == "huge":
        new = draw(st.sampled_from(["1" + "0" * 400, "-1" + "0" * 400]))  # beyond 64 bits and float
    elif kind == "negative":
        new = _toml(-abs(value) - draw(st.sampled_from([1, 0.5, 10**6])))
    else:
        i = draw(st.integers(0, len(value)))
        new_name = value[:i] + draw(st.sampled_from(["x", "_", "q", "2"])) + value[i:]
        assume(new_name not in VALID_NAMES)
        new = repr(new_name)
    return name, [f"{key}={new}"], kind


@st.composite
def key_mutation(draw):
    """An unknown or misspelled key, or an unknown section."""
    name, section = draw(st.sampled_from(SECTIONS))
    kind = draw(st.sampled_from(["unknown key", "misspelled key", "unknown section"]))
    word = draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True))
    if kind == "unknown key":
        key = ".".join((*section, f"zz{word}"))
    elif kind == "misspelled key":
        existing = [p[-1] for n, p, _ in LEAVES if n == name and p[:-1] == section]
        original = draw(st.sampled_from(existing))
        i = draw(st.integers(0, len(original) - 1))
        typo = original[:i] + original[i] * 2 + original[i + 1:]  # one letter doubled
        assume(typo not in VALID_KEYS)
        key = ".".join((*section, typo))
    else:
        key = f"zz{word}.{draw(st.sampled_from(['name', 'lr', 'x']))}"
    return name, [f"{key}=1"], kind


JUNK_SET = st.one_of(
    st.text(st.characters(blacklist_characters="=", blacklist_categories=("Cs",)), max_size=30),
    st.sampled_from(["=", "=1", ".=1", "train..epochs=1", "train.=1", " . =2", "train=5",
                     "train.epochs.deeper=1", "seed.x=1", "perturb.99.rho=1",
                     "gradient_correct.x.y=1", "optimizer=[1, 2]", "sparsity.density"]),
    st.builds(lambda k, v: f"zz{k}={v}", st.text(max_size=20), st.text(max_size=20)),
)


@st.composite
def set_mutation(draw):
    """A ``--set`` that is not a well-formed override of a real option."""
    return draw(st.sampled_from(SHIPPED)), [draw(JUNK_SET)], "junk --set"


def _insert_line(text: str, line: str, at: int) -> str:
    lines = text.splitlines()
    at = min(at, len(lines))
    return "\n".join([*lines[:at], line, *lines[at:]]) + "\n"


@st.composite
def file_mutation(draw):
    """Malformed TOML or a broken ``extends`` (returns the new text of the file)."""
    name = draw(st.sampled_from(SHIPPED))
    text = (CONFIGS / name).read_text()
    kind = draw(st.sampled_from(["malformed TOML", "not UTF-8", "broken extends"]))
    if kind == "malformed TOML":
        junk = draw(st.sampled_from(["= 1", "[unclosed", "key = ", 'k = "open', "[[]]",
                                     "a = 1 = 2", "x = [1,", "\x00", "train = {"]))
        data = _insert_line(text, junk, draw(st.integers(0, 60))).encode()
    elif kind == "not UTF-8":
        data = _insert_line(text, "# caf\udce9", draw(st.integers(0, 60))).encode(
            "utf-8", "surrogateescape")
    else:
        target = draw(st.sampled_from([
            '"missing.toml"', '"."', '"diagnostics"', '"/etc/hostname"', "5", "[]", '""',
            '"~/base.toml"', '"MUTANT"', '"broken.base.toml"']))
        line = f"extends = {target}"
        body = re.sub(r"(?m)^extends\s*=.*$", "", text)
        data = f"{line}\n{body}".encode()
    return name, data, kind


def _kind_of(problem: str) -> str:
    """A problem line without its file, section, key and values: the sort of error it is."""
    msg = re.sub(r"^--set .*?: ", "--set: ", problem)
    msg = re.sub(r"^(?!--set)\S+?: ", "", msg)
    msg = re.sub(r"^\[\[?\w+\]\]?( #\d+)? ", "", msg)
    msg = re.sub(r"^[\w.\[\]]+: |^[\w.\[\]]+ (?=must|=|lists|is )", "", msg)
    msg = re.sub(r"unknown key [^;\s]+", "unknown key", msg)
    msg = re.sub(r";.*$|, got .*$|'[^']*'|\"[^\"]*\"|\(.*?\)|(?<!--set):.*$", "", msg)
    msg = re.sub(r"\{.*\}?|\bTrue\b|\bFalse\b", "", msg)
    words = [w for w in msg.split() if not re.search(r"[\d\[\]()]", w)]
    return " ".join(words[:6])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of ``configs/`` (mutants sit beside the files they extend) plus a broken base."""
    work = tmp_path_factory.mktemp("fuzz") / "configs"
    shutil.copytree(CONFIGS, work)
    (work / "broken.base.toml").write_text("[train\nepochs = 1\n")
    return work


@pytest.fixture(scope="module", autouse=True)
def fast_catalogue():
    """``describe`` builds its catalogue per call; the fuzz test reuses one (no entry
    points)."""
    with pytest.MonkeyPatch.context() as mp:
        # the CLI imports it from sparsefw.plugins when a command runs
        mp.setattr(plugins_mod, "load_catalogue", lambda: CATALOGUE)
        yield
    out = os.environ.get("SPARSEFW_FUZZ_KINDS")
    if out:
        with open(out, "a") as f:
            f.write("".join(f"{k}\n" for k in sorted(KINDS)))


COUNTER = iter(range(10**9))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=st.one_of(value_mutation(), key_mutation(), set_mutation(), file_mutation()))
def test_every_bad_config_is_a_config_error_with_exit_code_2(workdir, mutation):
    name, change, kind = mutation
    path, overrides = workdir / name, []
    if isinstance(change, bytes):
        path = workdir / Path(name).parent / f"mutant{next(COUNTER)}.toml"
        path.write_bytes(change.replace(b'"MUTANT"', f'"{path.name}"'.encode()))
    else:
        overrides = change
    # the error itself, with every problem on its own line
    with pytest.raises(ConfigError) as info:
        raw = config.apply_overrides(config.read_toml(path), overrides)
        config.structure(raw, CATALOGUE.registry, source=path.name)
    problems = info.value.problems
    assert problems and all(len(p) < 600 for p in problems), problems
    KINDS.update(_kind_of(p) for p in problems)
    # and the CLI's answer: exit code 2, the message, no traceback
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["describe", str(path), *(f"--set={o}" for o in overrides)])
    assert code == 2, (kind, change, err.getvalue())
    assert "problem" in err.getvalue() and "Traceback" not in err.getvalue()
