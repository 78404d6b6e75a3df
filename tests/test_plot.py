"""engine.plot: the PNG is valid (signature, chunk CRCs, zlib rows of the declared size) and shows the
series (pixels of each series' colour along its line, axes in black)."""

from __future__ import annotations

import struct
import zlib

import pytest

from engine.plot import COLORS, line_plot_png, read_png_size


def _decode_rgb(data: bytes) -> tuple[int, int, list[bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    w, h, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w) : (y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)  # filter type none
    return w, h, [r[1:] for r in rows]


def _count(rows: list[bytes], color) -> int:
    target = bytes(color)
    return sum(1 for r in rows for i in range(0, len(r), 3) if r[i : i + 3] == target)


def test_png_is_valid_and_draws_each_series(tmp_path):
    path = line_plot_png(
        tmp_path / "sub" / "loss.png",
        {"train": [(i, 5.0 / (1 + i)) for i in range(100)], "val": [(0, 5.0), (50, 0.3), (99, float("nan"))]},
        title="loss",
        xlabel="step",
        width=320,
        height=200,
    )
    data = path.read_bytes()
    assert read_png_size(data) == (320, 200)
    w, h, rows = _decode_rgb(data)
    assert (w, h) == (320, 200)
    assert _count(rows, COLORS[0]) > 150  # a 2-pixel line across the plot, plus the legend
    assert _count(rows, COLORS[1]) > 100
    assert _count(rows, (0, 0, 0)) > 400  # axes, ticks and labels


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="no finite points"):
        line_plot_png("/nonexistent/x.png", {"a": [(0, float("inf"))]})
    with pytest.raises(ValueError, match="not a PNG"):
        read_png_size(b"GIF89a")


def test_flat_and_single_point_series(tmp_path):
    path = line_plot_png(tmp_path / "flat.png", {"a": [(0, 1.0), (5, 1.0)], "b": [(3, 1.0)]})
    _, _, rows = _decode_rgb(path.read_bytes())
    assert _count(rows, COLORS[0]) > 0 and _count(rows, COLORS[1]) > 0
