"""A tiny PNG line plot (loss curves) written with zlib + struct: axes, nice ticks with labels in a 3x5
pixel font, one polyline per series and a legend.

Why not matplotlib: it is not installed, and for one figure per run it would add a ~40 MB dependency
(with numpy, pillow, fonttools, kiwisolver, ...) to `make run`; a PNG is a header, zlib-compressed
rows and a CRC per chunk, and the plot needs only lines and a dozen glyphs.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["line_plot_png", "read_png_size"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BIT_DEPTH, COLOR_TYPE_RGB = 8, 2
FILTER_NONE = 0
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
GLYPH_W, GLYPH_H = 3, 5
FONT_SCALE = 2  # each font pixel is a 2x2 block: legible at 640 x 400
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 36, 40
TICKS = 8

# 3x5 glyphs, rows top to bottom, '#' = ink. Lowercase letters are drawn as small capitals.
_FONT_ROWS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...", ":": "... .#. ... .#. ...", "/": "..# ..# .#. #.. #..",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", "=": "... ### ... ### ...",
    "%": "#.# ..# .#. #.. #.#", " ": "... ... ... ... ...", "_": "... ... ... ... ###",
    "a": ".#. #.# ### #.# #.#", "b": "##. #.# ##. #.# ##.", "c": ".## #.. #.. #.. .##",
    "d": "##. #.# #.# #.# ##.", "e": "### #.. ##. #.. ###", "f": "### #.. ##. #.. #..",
    "g": ".## #.. #.# #.# .##", "h": "#.# #.# ### #.# #.#", "i": "### .#. .#. .#. ###",
    "j": "..# ..# ..# #.# .#.", "k": "#.# #.# ##. #.# #.#", "l": "#.. #.. #.. #.. ###",
    "m": "#.# ### ### #.# #.#", "n": "##. #.# #.# #.# #.#", "o": ".#. #.# #.# #.# .#.",
    "p": "##. #.# ##. #.. #..", "q": ".#. #.# #.# ##. .##", "r": "##. #.# ##. #.# #.#",
    "s": ".## #.. .#. ..# ##.", "t": "### .#. .#. .#. .#.", "u": "#.# #.# #.# #.# ###",
    "v": "#.# #.# #.# #.# .#.", "w": "#.# #.# ### ### #.#", "x": "#.# #.# .#. #.# #.#",
    "y": "#.# #.# .#. .#. .#.", "z": "### ..# .#. #.. ###",
}  # fmt: skip
_FONT = {ch: rows.split() for ch, rows in _FONT_ROWS.items()}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(WHITE) * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, width: int = 1) -> None:
        """Bresenham's line; width 2 adds the pixel below and right of each step."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(width):
                for oy in range(width):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color=BLACK) -> None:
        """Draws s with its top-left corner at (x, y); unknown characters are blank."""
        for ch in s.lower():
            for r, row in enumerate(_FONT.get(ch, _FONT[" "])):
                for c, ink in enumerate(row):
                    if ink == "#":
                        for oy in range(FONT_SCALE):
                            for ox in range(FONT_SCALE):
                                self.set(x + c * FONT_SCALE + ox, y + r * FONT_SCALE + oy, color)
            x += (GLYPH_W + 1) * FONT_SCALE

    def png(self) -> bytes:
        stride = 3 * self.w
        raw = b"".join(bytes([FILTER_NONE]) + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, BIT_DEPTH, COLOR_TYPE_RGB, 0, 0, 0)
        return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def text_width(s: str) -> int:
    return len(s) * (GLYPH_W + 1) * FONT_SCALE


def _nice_ticks(lo: float, hi: float, n: int = TICKS) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:.4g}"


def line_plot_png(
    path: str | Path,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "",
    width: int = 640,
    height: int = 400,
) -> Path:
    """Writes a PNG of one line per series ({name: [(x, y), ...]}, non-finite points skipped), with axes,
    ticks, a title and a legend. Returns the path."""
    points = {
        k: [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()
    }
    every = [p for v in points.values() for p in v]
    if not every:
        raise ValueError("line_plot_png: no finite points to plot")
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    if xhi == xlo:
        xhi = xlo + 1.0
    pad = 0.05 * (yhi - ylo) if yhi > ylo else 0.5
    ylo, yhi = ylo - pad, yhi + pad
    canvas = _Canvas(width, height)
    left, right, top, bottom = MARGIN_LEFT, width - MARGIN_RIGHT, MARGIN_TOP, height - MARGIN_BOTTOM

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = left + (x - xlo) / (xhi - xlo) * (right - left)
        py = bottom - (y - ylo) / (yhi - ylo) * (bottom - top)
        return round(px), round(py)

    for ty in _nice_ticks(ylo, yhi):
        _, py = to_px(xlo, ty)
        if top <= py <= bottom:
            canvas.line(left, py, right, py, GRID)
            label = _fmt(ty)
            canvas.text(left - 6 - text_width(label), py - GLYPH_H * FONT_SCALE // 2, label)
    for tx in _nice_ticks(xlo, xhi):
        px, _ = to_px(tx, ylo)
        if left <= px <= right:
            canvas.line(px, bottom, px, bottom + 4, BLACK)
            label = _fmt(tx)
            canvas.text(px - text_width(label) // 2, bottom + 8, label)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    for i, (name, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            canvas.line(*to_px(x0, y0), *to_px(x1, y1), color, width=2)
        if len(pts) == 1:
            canvas.line(*to_px(*pts[0]), *to_px(*pts[0]), color, width=3)
        ly = top + 6 + i * (GLYPH_H + 3) * FONT_SCALE
        canvas.line(right - 150, ly + 4, right - 130, ly + 4, color, width=2)
        canvas.text(right - 124, ly, name)
    if title:
        canvas.text((width - text_width(title)) // 2, 10, title)
    if xlabel:
        canvas.text(right - text_width(xlabel), height - 14, xlabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


def read_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking the signature and the IHDR chunk's CRC."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("read_png_size: not a PNG (bad signature)")
    length, kind = struct.unpack(">I4s", data[8:16])
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    if kind != b"IHDR" or zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
        raise ValueError("read_png_size: bad IHDR chunk")
    return struct.unpack(">II", body[:8])
