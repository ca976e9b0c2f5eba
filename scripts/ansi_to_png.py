#!/usr/bin/env python3
"""Renders a terminal capture with ANSI colours (`tmux capture-pane -p -e`) to a PNG, for the
README's dashboard screenshot. Usage: python3 scripts/ansi_to_png.py SCREEN.ansi OUT.png
(needs pillow; uses DejaVu Sans Mono from assets/fonts or the system)."""

import pathlib
import re
import sys

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200), (188, 63, 188),
           (17, 168, 205), (229, 229, 229), (102, 102, 102), (241, 76, 76), (35, 209, 139),
           (245, 245, 67), (59, 142, 234), (214, 112, 214), (41, 184, 219), (255, 255, 255)]
FG, BG = (220, 220, 220), (24, 24, 27)


def color256(n):
    if n < 16:
        return PALETTE[n]
    if n < 232:
        n -= 16
        return tuple(0 if c == 0 else 55 + 40 * c for c in (n // 36, (n // 6) % 6, n % 6))
    return (8 + 10 * (n - 232),) * 3


def parse(text):
    """Yields rows of (char, fg, bg, bold)."""
    fg, bg, bold = FG, BG, False
    for line in text.split("\n"):
        row = []
        for part in re.split(r"(\x1b\[[0-9;]*m)", line):
            if part.startswith("\x1b["):
                codes = [int(c) if c else 0 for c in part[2:-1].split(";")]
                i = 0
                while i < len(codes):
                    c = codes[i]
                    if c == 0:
                        fg, bg, bold = FG, BG, False
                    elif c == 1:
                        bold = True
                    elif c == 22:
                        bold = False
                    elif 30 <= c <= 37:
                        fg = PALETTE[c - 30]
                    elif 90 <= c <= 97:
                        fg = PALETTE[c - 90 + 8]
                    elif 40 <= c <= 47:
                        bg = PALETTE[c - 40]
                    elif 100 <= c <= 107:
                        bg = PALETTE[c - 100 + 8]
                    elif c == 39:
                        fg = FG
                    elif c == 49:
                        bg = BG
                    elif c in (38, 48) and i + 1 < len(codes):
                        if codes[i + 1] == 5 and i + 2 < len(codes):
                            col = color256(codes[i + 2]); i += 2
                        elif codes[i + 1] == 2 and i + 4 < len(codes):
                            col = tuple(codes[i + 2:i + 5]); i += 4
                        else:
                            col = FG
                        if c == 38:
                            fg = col
                        else:
                            bg = col
                    i += 1
            else:
                row.extend((ch, fg, bg, bold) for ch in part)
        yield row


source, target = sys.argv[1], sys.argv[2]
rows = list(parse(pathlib.Path(source).read_text(encoding="utf-8").rstrip("\n")))
repo = pathlib.Path(__file__).resolve().parent.parent
font_path = next(p for p in [repo / "assets/fonts/DejaVuSansMono.ttf", pathlib.Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")] if p.exists())
font = ImageFont.truetype(str(font_path), 14)
cw = round(font.getlength("M"))
ch = 17
width = max(len(r) for r in rows) * cw
image = Image.new("RGB", (width + 16, len(rows) * ch + 16), BG)
draw = ImageDraw.Draw(image)
for y, row in enumerate(rows):
    for x, (c, fg, bg, bold) in enumerate(row):
        px, py = 8 + x * cw, 8 + y * ch
        if bg != BG:
            draw.rectangle([px, py, px + cw, py + ch], fill=bg)
        if 0x2800 <= ord(c) <= 0x28FF:
            # Braille cells (how the charts draw curves): the font has no such glyphs, so draw
            # the 2x4 dot pattern. Bits 0-2 and 6 are the left column top to bottom, 3-5 and
            # 7 the right column.
            bits = ord(c) - 0x2800
            for bit, (col, row) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3)]):
                if bits >> bit & 1:
                    dx, dy = px + 2 + col * (cw - 4), py + 2 + row * (ch - 4) / 3
                    draw.rectangle([dx - 1, dy - 1, dx + 1, dy + 1], fill=fg)
        elif c != " ":
            draw.text((px, py), c, font=font, fill=fg)
image.save(target)
print(f"wrote {target}: {image.size[0]}x{image.size[1]}")
