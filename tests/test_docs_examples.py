"""Every Python example in README.md and docs/ runs offline as it stands, or its first line says what it
needs (a comment starting "# needs"), e.g. a downloaded pipeline or TensorRT."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for page in PAGES:
        for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
            yield pytest.param(page, code, id=f"{page.relative_to(ROOT)}:{i + 1}")


ALL = list(examples())


def test_every_example_that_cannot_run_offline_says_what_it_needs():
    """The names of downloaded pipelines appear only in examples marked as needing one."""
    for param in ALL:
        _, code = param.values
        if code.startswith("# needs"):
            continue
        source = re.sub(r"#.*$", "", code, flags=re.M)  # what runs, not the comments
        used = re.findall(r"\b(pipe|flux_pipe|sd3_pipe)\b\s*[.(=,)]", source)
        defined = re.findall(r"^(pipe|flux_pipe|sd3_pipe)\s*=", source, re.M)
        assert not set(used) - set(defined), f"{param.id}: uses {set(used)} without a '# needs' line"


@pytest.mark.parametrize(("page", "code"), [p for p in ALL if not p.values[1].startswith("# needs")])
def test_example_runs_offline(page, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write files (exports) where they run
    exec(compile(code, str(page), "exec"), {"__name__": "__docs_example__"})
    capsys.readouterr()
