"""MkDocs hooks (mkdocs.yml ``hooks:``).

- The home page is README.md, its links made site-relative: one text for the repository and the site.
- Docstrings cite objects Sphinx-style (:func:`tfq.evaluate`); the site shows the name alone.
- Docstrings index arrays in prose (``x[0]["agreement"]``, ``[0.0, 2.0]``): Markdown reads ``[..][..]``
  as a reference link and autorefs warns that no such object exists. Those warnings (a target that is
  not a dotted Python name) are dropped, so ``mkdocs build --strict`` still fails on every broken link
  and on a cross-reference to a Python object that does not exist.
"""

import logging
import re
from pathlib import Path

_NOT_A_NAME = re.compile(r"Could not find cross-reference target '(?![A-Za-z_][\w.]*')")


class _DropSubscripts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOT_A_NAME.search(record.getMessage())


def on_config(config):
    # The records propagate to the handlers of the "mkdocs" logger (the console and strict mode's counter);
    # a filter on a handler sees them, a filter on a parent logger would not.
    for handler in logging.getLogger("mkdocs").handlers:
        if not any(isinstance(f, _DropSubscripts) for f in handler.filters):
            handler.addFilter(_DropSubscripts())
    return config


def on_page_read_source(page, config):
    """The home page is the README (one text for the repository page and the site), links made site-relative."""
    if page.file.src_uri != "index.md":
        return None
    readme = Path(config["docs_dir"]).parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    return text.replace("](docs/", "](").replace("](notebooks/)", "](notebooks/01_ptq_quickstart.ipynb)")


_SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    """Docstrings cite objects Sphinx-style (:func:`tfq.evaluate`); the site shows the name alone."""
    return _SPHINX_ROLE.sub("", html)
