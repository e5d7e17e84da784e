"""MkDocs hook: the pages' LaTeX becomes MathML at build time, so the site needs no network.

pymdownx.arithmatex (generic mode) leaves each formula as ``\\(...\\)`` in a
``<span class="arithmatex">`` or ``\\[...\\]`` in a ``<div class="arithmatex">``; this hook
converts the formula with latex2mathml (pure Python), which every current browser renders
natively. A command latex2mathml does not know would be printed raw, so the build fails
instead, naming the page and the formula.
"""

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\[(\[](?P<tex>.*?)\\[)\]]\s*</(?P=tag)>', re.S)
# Rewrites into forms latex2mathml renders: it prints a sized \lVert, \Vert or \| raw, and
# knows neither \arg nor the escapes \_ \& \% \# inside text-mode arguments.
SIZED_NORM = re.compile(r"\\(big|Big|bigg|Bigg)([lrm]?)\s*\\(lVert|rVert|Vert|\|)")
NORM = re.compile(r"\\(lVert|rVert|Vert)(?![A-Za-z])")
TEXT_ARGUMENT = re.compile(r"\\(text|texttt|textrm|textit|textbf)\{([^{}]*)\}")
TEXT_ESCAPE = re.compile(r"\\([_&%#])")
LEFTOVER_COMMAND = re.compile(r"\\[A-Za-z]+|\\[|{}_]")


def _supported_tex(tex):
    tex = SIZED_NORM.sub(lambda m: f"\\{m[1]}{m[2]}\u2016", tex)
    tex = NORM.sub(r"\\|", tex)
    tex = re.sub(r"\\arg(?![A-Za-z])", r"\\operatorname{arg}", tex)
    return TEXT_ARGUMENT.sub(_unescaped_text, tex)


def _unescaped_text(match):
    return "\\" + match[1] + "{" + TEXT_ESCAPE.sub(r"\1", match[2]) + "}"


def _mathml(match, page):
    tex = html.unescape(match["tex"]).strip()
    display = "block" if match["tag"] == "div" else "inline"
    mathml = convert(_supported_tex(tex), display=display)
    leftover = LEFTOVER_COMMAND.search(mathml)
    if leftover:
        raise PluginError(f"{page}: latex2mathml cannot render {leftover[0]!r} in {tex!r}")
    return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'


def on_page_content(html_text, page, **_):
    return ARITHMATEX.sub(lambda match: _mathml(match, page.file.src_uri), html_text)
