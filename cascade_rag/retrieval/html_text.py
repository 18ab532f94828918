"""Visible text of an HTML page in one forward pass, linear in the page's size.

`html_text` scans the markup once, left to right, and never builds a tree: a line break at the
start and end of each block element and at each <br>, the text between tags joined as written
(so inline elements such as <b> keep their surrounding spaces), character references decoded,
and nothing from <script>, <style>, <noscript> or <template>. Whitespace inside a line collapses
to one space and empty lines are dropped.

Why not a tree: BeautifulSoup's `insert_after` on a tag walks the tag's whole subtree to find its
last descendant, so marking block ends over N nested <div>s costs O(N^2) (a 550 KB page of
nested divs took minutes), and the standard library's `html.parser` (Python 3.11) rescans from
every unterminated construct, so a page of `<a <a <a ...` or of unclosed `<!--` is quadratic
too. Here every search starts where the previous one ended; an unterminated tag, comment or
raw-text element ends the scan (its rest is dropped, as a browser drops it), so the work is
O(len(page)) whatever the nesting or the damage.

This module does not read files, validate HTML, follow links or run scripts, and it does not
keep attributes (alt text, titles of links) or table structure beyond line breaks.
"""

from __future__ import annotations

import html
import re

_BLOCKS = frozenset(
    "address article aside blockquote dd details dialog div dl dt fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table tbody "
    "td th thead tfoot title tr ul caption option".split()
)
_HIDDEN = frozenset(("noscript", "template"))  # their content is markup, but not shown
_RAW_TEXT = frozenset(("script", "style"))  # content is not markup, not shown
_RCDATA = frozenset(("title", "textarea"))  # content is text (no tags inside), shown

_TAG_NAME = re.compile(r"(/?)([A-Za-z][^\s/>]*)")
# the end of a tag, or the opening quote of an attribute value (which may hold '>')
_TAG_END_OR_QUOTE = re.compile(r"""=\s*(["'])|>""")
_SPACES = re.compile(r"[^\S\n]+")


def html_text(page: str) -> tuple[str, str]:
    """The visible text of an HTML page and its <title>.

    Args:
        page: the HTML source.
    Returns:
        (text, title): the text, a line per block element; the title ("" if none).

    Example:
        >>> html_text("<title>Parks</title><p>The <b>rose</b> garden.</p><script>x()</script>")
        ('Parks\\nThe rose garden.', 'Parks')
    """
    lower = page.lower()  # for case-insensitive searches of end tags, made once
    out: list[str] = []
    title = ""
    hidden = 0  # depth inside <noscript>/<template>
    pos, end = 0, len(page)
    while pos < end:
        lt = page.find("<", pos)
        if lt < 0:
            lt = end
        if lt > pos and not hidden:
            out.append(html.unescape(page[pos:lt]))
        if lt >= end:
            break
        nxt = page[lt + 1 : lt + 2]
        if nxt == "!":  # comment, doctype or CDATA section
            if page.startswith("<!--", lt):
                close = page.find("-->", lt + 4)
                pos = end if close < 0 else close + 3
            else:
                close = page.find(">", lt + 2)
                pos = end if close < 0 else close + 1
            continue
        if nxt == "?":  # processing instruction
            close = page.find(">", lt + 2)
            pos = end if close < 0 else close + 1
            continue
        name_match = _TAG_NAME.match(page, lt + 1)
        if name_match is None:  # "a < b": a literal '<'
            if not hidden:
                out.append("<")
            pos = lt + 1
            continue
        close = _tag_end(page, name_match.end())
        if close < 0:  # unterminated tag: a browser drops the rest too
            break
        pos = close + 1
        is_end, name = name_match.group(1) == "/", name_match.group(2).lower()
        if name in _BLOCKS or name == "br":
            out.append("\n")
        if name in _HIDDEN:
            hidden = max(0, hidden - 1) if is_end else hidden + 1
        elif not is_end and (name in _RAW_TEXT or name in _RCDATA):
            stop = lower.find("</" + name, pos)
            stop = end if stop < 0 else stop
            if name in _RCDATA and not hidden:
                content = html.unescape(page[pos:stop])
                out.append(content)
                if name == "title" and not title:
                    title = " ".join(content.split())
            if stop >= end:
                break
            close = page.find(">", stop)
            pos = end if close < 0 else close + 1
            if name in _BLOCKS:
                out.append("\n")
    lines = (_SPACES.sub(" ", line).strip() for line in "".join(out).split("\n"))
    return "\n".join(line for line in lines if line), title


def _tag_end(page: str, start: int) -> int:
    """Index of the '>' closing the tag whose attributes start at `start`; -1 if none.

    Quoted attribute values are skipped whole, so a '>' inside one does not end the tag. Every
    search starts where the last one ended, so this is linear in the tag's length.
    """
    pos = start
    while True:
        m = _TAG_END_OR_QUOTE.search(page, pos)
        if m is None:
            return -1
        if m.group(1) is None:
            return m.start()
        quote_end = page.find(m.group(1), m.end())
        if quote_end < 0:
            return -1
        pos = quote_end + 1
