"""Model replies as Qt rich text: Markdown parsed by markdown-it-py, code highlighted by Pygments.

Safe by construction: raw HTML in a reply is escaped (markdown-it's `html` option is off),
images become a text placeholder and links plain underlined text with their address shown,
so the view never loads or opens anything.

Bounded in cost: Qt lays out rich-text tables cell by cell, one unbroken word character by character, and
markdown-it walks nested brackets again at each level, so a reply past the limits below is shown as
plain text (a big table as aligned text, a huge reply cut short), with a line saying so. Copy still copies
the whole message.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from app.theme import Theme

MONO = "'DejaVu Sans Mono', 'Menlo', 'Consolas', monospace"

MAX_FORMATTED_CHARS = 30_000  # a longer reply is shown as plain text
MAX_WORD = 2_000  # characters without a space or line break: past this the reply is plain text
MAX_NESTING = 40  # brackets, parentheses or quote markers nested deeper: plain text
MAX_BLOCK_CHARS = 5_000  # a longer paragraph, list or table is shown as text: each block is parsed whole
MAX_TABLE_CELLS = 150  # a bigger table is shown as aligned text (Qt lays out a rich-text table cell by cell)
MAX_SHOWN_CHARS = 20_000  # a message is shown up to here; Copy copies all of it
MAX_SHOWN_LINE = 400  # plain text wraps every this many characters without a space, so layout stays cheap
_LONG_RUN = re.compile(rf"\S{{{MAX_SHOWN_LINE},}}")
_TOO_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


@dataclass(frozen=True)
class Rendered:
    html: str
    code_blocks: tuple[str, ...]  # sources of the code blocks; link "copy:i" copies the i-th
    plain_reason: str = ""  # why the text is shown unformatted, "" when it is formatted


def too_costly(text: str) -> str:
    """Why formatting `text` as Markdown would freeze the window, or "" when it is cheap enough."""
    if len(text) > MAX_FORMATTED_CHARS:
        return f"it is {len(text):,} characters long (formatting stops at {MAX_FORMATTED_CHARS:,})"
    longest = max((len(m) for m in _TOO_LONG_WORD.findall(text)), default=0)
    if longest:
        return f"it holds a {longest:,}-character word"
    depth = deepest = 0
    for ch in text if text.count("[") + text.count("(") > MAX_NESTING else "":
        if ch in "[(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "])" and depth:
            depth -= 1
    quotes = max((m.count(">") for m in re.findall(r"^(?:[ \t]*>)+", text, flags=re.MULTILINE)), default=0)
    if deepest > MAX_NESTING or quotes > MAX_NESTING:
        return f"it nests brackets or quotes more than {MAX_NESTING} deep"
    return ""


def bounded_plain_html(text: str) -> str:
    """`text` as escaped rich text whose layout cost is bounded: at most MAX_SHOWN_CHARS, long unbroken
    runs given a break opportunity (a zero-width space) every MAX_SHOWN_LINE characters."""
    shown = text[:MAX_SHOWN_CHARS]
    if _LONG_RUN.search(shown):
        shown = _LONG_RUN.sub(lambda m: "\u200b".join(m[0][i:i + MAX_SHOWN_LINE]
                                                      for i in range(0, len(m[0]), MAX_SHOWN_LINE)), shown)
    body = plain_html(shown)
    if len(text) > MAX_SHOWN_CHARS:
        body += (f"<br><i>… {len(text) - MAX_SHOWN_CHARS:,} more characters not shown: "
                 "Copy copies the whole message.</i>")
    return body


class MarkdownRenderer:
    def __init__(self, theme: Theme) -> None:
        self.theme = theme
        self._formatter = HtmlFormatter(nowrap=True, noclasses=True, style=theme.pygments_style)
        self._md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
        self._md.enable(["table", "strikethrough"])
        # The same block grammar without inline parsing: finds where top-level blocks start, cheaply.
        self._blocks_md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
        self._blocks_md.disable("inline")
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
        """`text` as Markdown, or as plain text with a line saying why when formatting it would be too slow."""
        reason = too_costly(text)
        if reason:
            return self.plain(text, reason)
        return self.render_blocks([text], whole_blocks=False)

    def plain(self, text: str, reason: str) -> Rendered:
        """`text` unformatted (bounded_plain_html) under a line saying why."""
        note = f'<p style="color:{self.theme.muted};"><i>Shown as plain text: {html.escape(reason)}.</i></p>'
        return Rendered(html=note + bounded_plain_html(text), code_blocks=(), plain_reason=reason)

    def blocks(self, text: str) -> list[str]:
        """`text` (line breaks normalised) cut into its top-level Markdown blocks (a paragraph, a whole list,
        a table, a code block…, each with the blank lines after it). Each renders alone as it does in the
        whole text (reference-style links aside), which is what lets a streaming reply re-render only its
        last block. The pieces join back into the text."""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        starts = [t.map[0] for t in self._blocks_md.parse(text) if t.level == 0 and t.nesting >= 0 and t.map]
        if not starts:
            return [text] if text else []
        starts[0] = 0
        return ["".join(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]

    def render_blocks(self, sources: list[str], first_code: int = 0, highlight_code: bool = True,
                      whole_blocks: bool = True) -> Rendered:
        """Markdown `sources` as rich text; code blocks count from `first_code` (their "copy:i" links), and
        `highlight_code=False` skips Pygments (a code block still being written). A block longer than
        MAX_BLOCK_CHARS is not parsed: its text is shown as is (a code block unhighlighted), since one
        block is laid out and re-rendered as a whole. `whole_blocks=False`: a source may hold several
        blocks (a whole reply), so a long one is cut into its blocks first."""
        t = self.theme
        env: dict[str, Any] = {"code": [""] * first_code, "plain_code": not highlight_code}
        parts: list[str] = []
        pending: list[str] = []

        def flush() -> None:
            if pending:
                tokens = _tables_as_text(self._md.parse("".join(pending), env))
                parts.append(self._md.renderer.render(tokens, self._md.options, env))
                pending.clear()

        for source in sources:
            pieces = self.blocks(source) if not whole_blocks and len(source) > MAX_BLOCK_CHARS else [source]
            for piece in pieces:
                if len(piece) <= MAX_BLOCK_CHARS:
                    pending.append(piece)
                    continue
                flush()
                if piece.lstrip(" ").startswith(("```", "~~~")):  # parsing a code block is cheap: no colours
                    env["plain_code"], plain = True, env["plain_code"]
                    pending.append(piece)
                    flush()
                    env["plain_code"] = plain
                else:
                    token = Token("fence", "code", 0, block=True, content=piece,
                                  meta={"label": f"{len(piece):,} characters in one block, shown as text"})
                    parts.append(self._fence([token], 0, self._md.options, env))
        flush()
        style = (
            "<style>"
            f"h1 {{ font-size: x-large; }} h2 {{ font-size: large; }} h3, h4, h5, h6 {{ font-size: medium; }}"
            f"blockquote {{ color: {t.muted}; }}"
            "p { margin-top: 0px; margin-bottom: 8px; }"
            f"a {{ color: {t.accent}; }}"
            "</style>"
        )
        return Rendered(html=style + "".join(parts), code_blocks=tuple(env["code"][first_code:]))

    # ----- renderer rules (signature: tokens, idx, options, env) ------------------------------------
    def _fence(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        token = tokens[idx]
        code = token.content
        language = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
        blocks: list[str] = env["code"]
        index = len(blocks)
        blocks.append(code.rstrip("\n"))
        lexer = _lexer(language) if language and not env["plain_code"] else None
        body = highlight(code, lexer, self._formatter) if lexer is not None else html.escape(code)
        body = body.rstrip("\n")
        t = self.theme
        label = html.escape(str(token.meta.get("label", "")) or language or "code")
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


@functools.lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer | None:
    """Pygments' lexer for `language`, or None; looked up once (a lookup scans the plugin table)."""
    try:
        return get_lexer_by_name(language, stripnl=False)
    except ClassNotFound:
        return None


def _tables_as_text(tokens: list[Token]) -> list[Token]:
    """Each table of more than MAX_TABLE_CELLS cells replaced by a code block of aligned columns."""
    out: list[Token] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.type != "table_open":
            out.append(token)
            i += 1
            continue
        end = next(j for j in range(i, len(tokens)) if tokens[j].type == "table_close")
        cells = sum(1 for tk in tokens[i:end] if tk.type in ("th_open", "td_open"))
        if cells <= MAX_TABLE_CELLS:
            out.extend(tokens[i:end + 1])
        else:
            rows: list[list[str]] = []
            for tk in tokens[i:end]:
                if tk.type == "tr_open":
                    rows.append([])
                elif tk.type == "inline" and rows:
                    rows[-1].append(tk.content)
            fence = Token("fence", "code", 0, block=True, content=aligned_table(rows),
                          meta={"label": f"table of {cells:,} cells, shown as text"})
            fence.map = token.map
            out.append(fence)
        i = end + 1
    return out


def aligned_table(rows: list[list[str]]) -> str:
    """Rows of cells as text columns padded to a common width, a rule under the header row."""
    widths = [max((len(r[c]) for r in rows if c < len(r)), default=0) for c in range(max(map(len, rows), default=0))]
    lines = [" | ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows]
    if lines:
        lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def plain_html(text: str) -> str:
    """A user's message as rich text: escaped, line breaks kept."""
    return html.escape(text).replace("\n", "<br>")

