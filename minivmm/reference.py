"""The reference (docs/*.md), shipped inside the package as ``minivmm/docs`` so that
``minivmm docs`` reads it after a plain ``pip install``. In the source tree that
directory is a link to ``docs/``, which stays where the README's links point."""

from __future__ import annotations

from importlib import resources

from .errors import MinivmmError


def _pages() -> dict[str, object]:
    folder = resources.files("minivmm").joinpath("docs")
    return {page.name.removesuffix(".md"): page for page in sorted(folder.iterdir(), key=lambda p: p.name)
            if page.name.endswith(".md") and page.name != "README.md"}


def topics() -> dict[str, str]:
    """Each topic's name (its file's, ``cli`` for cli.md) and title (its first heading)."""
    return {name: page.read_text(encoding="utf-8").splitlines()[0].lstrip("# ") for name, page in _pages().items()}


def text(topic: str) -> str:
    """The page of ``topic``, as written (Markdown)."""
    page = _pages().get(topic.removesuffix(".md"))
    if page is None:
        raise MinivmmError(f"no documentation topic '{topic}' (topics: {', '.join(_pages())})")
    return page.read_text(encoding="utf-8")
