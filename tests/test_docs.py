"""The documentation tool: the generated configuration reference is current, the guides' code
blocks run, and the checker catches broken blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsefw import docs_tool
from sparsefw.config import in_range, one_of

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_current():
    expected = docs_tool.generate_reference()
    assert docs_tool.REFERENCE.exists(), "run `python -m sparsefw.docs_tool`"
    assert docs_tool.REFERENCE.read_text() == expected, (
        "docs/configuration.md is out of date: run `python -m sparsefw.docs_tool`")


def test_api_reference_is_current_and_covers_the_author_api():
    from sparsefw import api_reference

    expected = api_reference.generate()
    assert docs_tool.API_REFERENCE.read_text() == expected, (
        "docs/api.md is out of date: run `python -m sparsefw.docs_tool`")
    for name in ("TrainState", "MaskSet", "topk_mask", "Perturbation", "TopologyChange",
                 "in_range", "one_of", "check_component", "Sparsifier", "DropGrow"):
        assert f".{name}`" in expected, name
    assert "| `dense_momentum` |" in expected  # TrainState's fields with their comments
    assert "- `update(self, name: str, mask: torch.Tensor) -> None`" in expected


def test_reference_lists_every_core_section_and_component():
    from sparsefw.config import PLAIN_SECTIONS
    from sparsefw.plugins import load_catalogue

    text = docs_tool.generate_reference()
    for section, cls in PLAIN_SECTIONS.items():
        assert f"## [{section}]" in text
        for field in cls.__attrs_attrs__:
            assert f"| `{field.name}` |" in text
    reg = load_catalogue(autoload=False).registry
    for entry in reg.entries.values():
        assert f"`{entry.name}`" in text, entry
    assert "| `drop_fraction` |" in text and "| `every` |" in text


def test_every_toml_block_in_the_docs_is_valid():
    problems = docs_tool.check_pages(docs_tool.guide_pages(DOCS), langs=("toml",),
                                     echo=lambda _: None)
    assert problems == []


def test_plugin_authoring_guide_runs():
    """Its python blocks define a rule, run the contract suite on it and train with it."""
    problems = docs_tool.check_pages([DOCS / "plugin-authoring.md"], echo=lambda _: None)
    assert problems == []


def test_your_loop_guide_runs():
    """Its python blocks train with the Sparsifier with and without a closure."""
    problems = docs_tool.check_pages([DOCS / "your-loop.md"], echo=lambda _: None)
    assert problems == []


def test_readme_example_runs_as_written():
    readme = DOCS.parent / "README.md"
    blocks = [b for b in docs_tool.code_blocks(readme) if b.lang == "python"]
    assert blocks, "the README shows a Sparsifier example"
    problems = docs_tool.check_pages([readme], langs=("python",), echo=lambda _: None)
    assert problems == []


def test_guides_exist_and_link_each_other():
    for name in ("getting-started.md", "plugin-authoring.md", "reports.md", "configuration.md"):
        assert (DOCS / name).exists(), name
    start = (DOCS / "getting-started.md").read_text()
    assert "configuration.md" in start and "reports.md" in start and "plugin-authoring.md" in start


BROKEN_PAGE = """# A page

```toml
[sparsity]
density = 2.0
```

```toml
[topology_update]
name = "no_such_rule"
```

```toml
[project]
name = "not-a-run-config"
```

```python
x = 1
```

```python
assert x == 2, "x is 1"
```

<!-- docs: no-check -->
```python
import no_such_module
```

```console
$ sparsefw --version
sparsefw 0.1.0
$ sparsefw train no-such-config.toml
$ pip install nothing-at-all
$ false
```
"""


def test_checker_reports_each_broken_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(BROKEN_PAGE)
    problems = docs_tool.check_pages([page], echo=lambda _: None)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "page.md:3: toml" in text and "density must be in (0, 1]" in text
    assert "page.md:8: toml" in text and "no_such_rule" in text and "choices:" in text
    assert "page.md:22: python" in text and "x is 1" in text
    assert "page.md:31: console" in text and "no-such-config.toml" in text


def test_console_commands_and_fences():
    assert docs_tool.console_commands("$ a \\\n  --b c\nout\n$ d") == ["a --b c", "d"]
    blocks = docs_tool.code_blocks(DOCS / "reports.md")
    assert {b.lang for b in blocks} >= {"console", "python"}


@pytest.mark.parametrize("validator,text", [
    (in_range(0, 1), "in (0, 1]"),
    (in_range(0, 1, lo_open=False, hi_open=True), "in [0, 1)"),
    (in_range(0), "> 0"),
    (in_range(0, lo_open=False), ">= 0"),
    (one_of("a", "b"), "one of: `a`, `b`"),
])
def test_describe_validator(validator, text):
    assert docs_tool.describe_validator(validator) == text


def test_check_mode_fails_on_a_stale_reference(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(docs_tool, "REFERENCE", stale)
    monkeypatch.setattr(docs_tool, "REPO", tmp_path)
    page = tmp_path / "ok.md"
    page.write_text("```toml\nseed = 1\n```\n")
    assert docs_tool.main(["--check", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert docs_tool.main([]) == 0 and stale.read_text() == docs_tool.generate_reference()
    assert docs_tool.main(["--check", str(page)]) == 0
