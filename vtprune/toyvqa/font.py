"""A tiny 5x7 bitmap font for the fine-detail reading questions.

The glyphs are drawn from these bitmaps (not from a system font) so that the
images are the same on every machine and Pillow version.
"""

from __future__ import annotations

import numpy as np

_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    "a": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "e": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "f": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "h": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "k": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "l": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "p": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "r": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "t": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "x": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
}

#: The characters a reading question can ask about (answers are lower case).
CHARS: tuple[str, ...] = tuple(_GLYPHS)


def glyph(char: str, scale: int) -> np.ndarray:
    """Return the boolean mask (7*scale, 5*scale) of ``char`` drawn at ``scale``."""
    if char not in _GLYPHS:
        raise ValueError(f"char {char!r} not in the toy font {CHARS}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rows = np.array([[c == "#" for c in row] for row in _GLYPHS[char]], dtype=bool)
    return np.kron(rows, np.ones((scale, scale), dtype=bool))
