"""Model replies as Qt rich text: Markdown parsed by markdown-it-py, code highlighted by Pygments.

Safe by construction: raw HTML in a reply is escaped (markdown-it's `html` option is off),
images become a text placeholder and links plain underlined text with their address shown,
so the view never loads or opens anything.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from app.theme import Theme

MONO = "'DejaVu Sans Mono', 'Menlo', 'Consolas', monospace"


@dataclass(frozen=True)
class Rendered:
    html: str
    code_blocks: tuple[str, ...]  # sources of the code blocks; link "copy:i" copies the i-th


class MarkdownRenderer:
    def __init__(self, theme: Theme) -> None:
        self.theme = theme
        self._formatter = HtmlFormatter(nowrap=True, noclasses=True, style=theme.pygments_style)
        self._md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
        self._md.enable(["table", "strikethrough"])
        rules: dict[str, Any] = self._md.renderer.rules  # type: ignore[attr-defined]  # RendererHTML's
        rules["fence"] = self._fence
        rules["code_block"] = self._fence
        rules["code_inline"] = self._code_inline
        rules["image"] = self._image
        rules["link_open"] = self._link_open
        rules["link_close"] = self._link_close
        rules["table_open"] = lambda *a: (
            f'<table border="1" cellspacing="0" cellpadding="4" style="border-color:{theme.code_border};'
            ' border-collapse:collapse;">'
        )

    def render(self, text: str) -> Rendered:
        env: dict[str, Any] = {"code": []}
        body = self._md.render(text, env)
        t = self.theme
        style = (
            "<style>"
            f"h1 {{ font-size: x-large; }} h2 {{ font-size: large; }} h3, h4, h5, h6 {{ font-size: medium; }}"
            f"blockquote {{ color: {t.muted}; }}"
            "p { margin-top: 0px; margin-bottom: 8px; }"
            f"a {{ color: {t.accent}; }}"
            "</style>"
        )
        return Rendered(html=style + body, code_blocks=tuple(env["code"]))

    # ----- renderer rules (signature: tokens, idx, options, env) ------------------------------------
    def _fence(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        token = tokens[idx]
        code = token.content
        language = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
        blocks: list[str] = env["code"]
        index = len(blocks)
        blocks.append(code.rstrip("\n"))
        try:
            lexer = get_lexer_by_name(language, stripnl=False) if language else None
        except ClassNotFound:
            lexer = None
        body = highlight(code, lexer, self._formatter) if lexer is not None else html.escape(code)
        body = body.rstrip("\n")
        t = self.theme
        label = html.escape(language or "code")
        return (
            f'<table width="100%" cellspacing="0" cellpadding="6" border="0" bgcolor="{t.code_bg}"'
            f' style="margin-top:4px; margin-bottom:10px;">'
            f'<tr><td style="color:{t.muted}; font-size:small;">{label}</td>'
            f'<td align="right" style="font-size:small;"><a href="copy:{index}" style="color:{t.accent};">'
            "Copy</a></td></tr>"
            f'<tr><td colspan="2"><pre style="margin:0px; white-space:pre-wrap; font-family:{MONO};">{body}</pre>'
            "</td></tr></table>"
        )

    def _code_inline(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return (f'<code style="font-family:{MONO}; background-color:{self.theme.inline_code_bg};">'
                f"{html.escape(tokens[idx].content)}</code>")

    def _image(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        token = tokens[idx]
        alt = html.escape(token.content or "image")
        src = html.escape(str(token.attrGet("src") or ""))
        return f'<span style="color:{self.theme.muted};">[image: {alt}] ({src})</span>'

    def _link_open(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        env.setdefault("links", []).append(str(tokens[idx].attrGet("href") or ""))
        return f'<span style="color:{self.theme.accent}; text-decoration:underline;">'

    def _link_close(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        href = env["links"].pop() if env.get("links") else ""
        # Show the address next to the text: the view never follows a link, the reader can.
        text_before = tokens[idx - 1].content if idx > 0 else ""
        if href and href != text_before:
            return f'</span><span style="color:{self.theme.muted};"> ({html.escape(href)})</span>'
        return "</span>"


def plain_html(text: str) -> str:
    """A user's message as rich text: escaped, line breaks kept."""
    return html.escape(text).replace("\n", "<br>")

