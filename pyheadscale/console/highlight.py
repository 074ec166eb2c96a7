"""HuJSON syntax highlighting for the pages that show a policy without the editor (works
without JavaScript; the editor's live highlighting in static/console.js uses the same
token classes)."""

from __future__ import annotations

import html
import re

from markupsafe import Markup

_TOKEN = re.compile(r"""
    (?P<comment>//[^\n]*|/\*.*?(?:\*/|$))
  | (?P<string>"(?:[^"\\\n]|\\.)*"?)
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<literal>\b(?:true|false|null)\b)
  | (?P<punct>[{}\[\],:])
""", re.VERBOSE | re.DOTALL)


def hujson(text: str) -> Markup:
    """The text as HTML with <span class="hj-KIND"> around each token; a string followed by
    a colon is a key ("hj-key")."""
    out: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        kind = m.lastgroup or "punct"
        if kind == "string" and re.match(r"\s*:", text[m.end():m.end() + 64]):
            kind = "key"
        out.append(f'<span class="hj-{kind}">{html.escape(m.group())}</span>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return Markup("".join(out))
