"""HTML pages from Jinja2 templates (``bonescreen/templates``): the validation report and the monitor page.

One environment, autoescaped, ``StrictUndefined`` (a misspelt variable is an error,
not an empty cell). Pages are self-contained: figures are embedded PNGs, no scripts,
no links to fetch. DataFrames become journal-style tables through :func:`table_html`
(pandas' escaped HTML, marked safe once it is built).
"""

from __future__ import annotations

import base64
import re
from functools import lru_cache
from typing import Any

import pandas as pd

__all__ = ["png_data_uri", "render", "table_html"]


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("bonescreen", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.globals["table"] = table_html
    env.globals["png"] = png_data_uri
    return env


def render(name: str, **ctx: Any) -> str:
    """Render ``templates/<name>`` with ``ctx``."""
    return str(_env().get_template(name).render(**ctx))


def table_html(df: pd.DataFrame, caption: str, index: bool = True) -> Any:
    """A DataFrame as ``<table class="j">`` with a caption (cells escaped by pandas)."""
    from markupsafe import Markup, escape

    body = df.to_html(classes="j", border=0, index=index, escape=True, na_rep="NA")
    body = re.sub(r'<table[^>]*class="dataframe j"[^>]*>',
                  f'<table class="j"><caption>{escape(caption)}</caption>', body, count=1)
    return Markup(f"<div class='tw'>{body}</div>")  # noqa: S704 - built from escaped parts


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
