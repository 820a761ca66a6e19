"""HTML pages -> plain UTF-8 text (used by scripts/get_corpus.sh; standard library only).

Keeps the text of <body>, drops <script>, <style>, <head> and navigation (id "banner", class "docnav"),
starts a new line at block elements and collapses runs of blank lines. Usage: python scripts/html_to_text.py SRC_DIR DST_DIR  (every *.html in
SRC_DIR, not recursive, becomes DST_DIR/NAME.txt).
"""

from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path

_SKIP = {"script", "style", "head", "title"}
_VOID = {"area", "base", "br", "col", "hr", "img", "input", "link", "meta", "source", "wbr"}
_BLOCK = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "blockquote"}


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.open: list[str] = []  # the open elements
        self.skip_at: int | None = None  # depth of the open element whose content is skipped
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag in _VOID:
            return
        attrs = dict(attrs)
        nav = attrs.get("id") == "banner" or "docnav" in (attrs.get("class") or "").split()
        if self.skip_at is None and (tag in _SKIP or nav):
            self.skip_at = len(self.open)
        self.open.append(tag)
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag not in self.open:
            return
        while self.open:  # also closes elements left open inside this one
            closed = self.open.pop()
            self.pre -= closed == "pre"
            if closed == tag:
                break
        if self.skip_at is not None and len(self.open) <= self.skip_at:
            self.skip_at = None

    def handle_data(self, data):
        if self.skip_at is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    lines = (line.rstrip() for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main(src: str, dst: str) -> None:
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for page in sorted(Path(src).glob("*.html")):
        (out / (page.stem + ".txt")).write_text(html_to_text(page.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:3])
