"""The README is a first page that links into docs/ (the MkDocs site; `make docs` builds it strictly)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "make run" in text and "make test" in text


def test_relative_links_of_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, page.name


def test_help_of_the_public_api_shows_no_sphinx_roles():
    """help(bypass_kernels.patch) and the rest read as plain text (the API reference renders the same
    docstrings)."""
    import pydoc
    import re

    from bypass_kernels.export import OnnxRuntimeUNet, to_onnx

    import bypass_kernels
    from bypass_kernels import presets

    objects = [getattr(bypass_kernels, name) for name in bypass_kernels.__all__ if name != "__version__"]
    objects += [presets.build_transformer, presets.transformer_inputs, to_onnx, OnnxRuntimeUNet]
    for obj in objects:
        text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
        assert not re.search(r":(func|meth|class|attr|mod|data|obj|exc):`", text), obj
