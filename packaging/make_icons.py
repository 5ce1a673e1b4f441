#!/usr/bin/env python3
"""Render every icon file from the one source image, resources/icons/cachet.svg.

    QT_QPA_PLATFORM=offscreen .venv/bin/python packaging/make_icons.py

Writes, beside the source: cachet.png (256 px, the window icon), cachet-<N>.png (the Linux hicolor
sizes, for the .desktop entry and the AppImage), cachet.ico (Windows: 16–256 px) and cachet.icns
(macOS: 16–1024 px). Qt renders the SVG; the .ico and .icns containers hold PNG images, which every
Windows since Vista and every macOS since 10.7 read, so no other image library is needed.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SOURCE = ICONS / "cachet.svg"
LINUX_SIZES = (16, 32, 48, 64, 128, 512)  # 256: cachet.png
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
# (type code, pixel size) of the PNG-bearing entries of an .icns file
ICNS_TYPES = (("icp4", 16), ("icp5", 32), ("icp6", 64), ("ic07", 128), ("ic08", 256), ("ic09", 512),
              ("ic10", 1024), ("ic11", 32), ("ic12", 64), ("ic13", 256), ("ic14", 512))


def render(renderer: QSvgRenderer, size: int) -> bytes:
    """The source drawn at size×size, as PNG bytes."""
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise RuntimeError(f"could not encode the {size} px icon")
    return bytes(data.data())


def ico(pngs: dict[int, bytes]) -> bytes:
    """A Windows .ico holding one PNG per size (ICONDIR, ICONDIRENTRYs, then the images)."""
    header = struct.pack("<HHH", 0, 1, len(pngs))
    offset = 6 + 16 * len(pngs)
    entries, images = b"", b""
    for size, png in sorted(pngs.items()):
        side = 0 if size >= 256 else size  # 0 means 256 in an ICONDIRENTRY
        entries += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), offset + len(images))
        images += png
    return header + entries + images


def icns(pngs: dict[int, bytes]) -> bytes:
    """An Apple .icns holding PNG entries for every size macOS asks for."""
    body = b"".join(kind.encode() + struct.pack(">I", 8 + len(pngs[size])) + pngs[size] for kind, size in ICNS_TYPES)
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def main() -> int:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    del app
    renderer = QSvgRenderer(str(SOURCE))
    if not renderer.isValid():
        print(f"make_icons: cannot read {SOURCE}", file=sys.stderr)
        return 1
    sizes = sorted({*LINUX_SIZES, *ICO_SIZES, *(s for _k, s in ICNS_TYPES)})
    pngs = {size: render(renderer, size) for size in sizes}
    (ICONS / "cachet.png").write_bytes(pngs[256])
    for size in LINUX_SIZES:
        (ICONS / f"cachet-{size}.png").write_bytes(pngs[size])
    (ICONS / "cachet.ico").write_bytes(ico({s: pngs[s] for s in ICO_SIZES}))
    (ICONS / "cachet.icns").write_bytes(icns(pngs))
    written = sorted(p.name for p in ICONS.iterdir() if p.name != SOURCE.name)
    print(f"make_icons: wrote {', '.join(written)} in {ICONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
