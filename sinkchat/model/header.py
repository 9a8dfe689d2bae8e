"""A GGUF file's metadata, read without its tensors, for the checks before anything is converted.

Why not ``gguf.GGUFReader``: it parses every tensor descriptor and materialises every array
element as a field (a 262,144-entry vocabulary included), 13 to 60 s for the small files measured
here, where the checks need a few numbers in the first kilobytes. This reads the key/value section
once (GGUF v2/v3 layout: ``GGUF``, version, tensor count, key count, then ``key, type, value``),
keeps the scalars and strings and skips arrays by their sizes (string arrays element by element,
without decoding them). No torch, no numpy.
"""

from __future__ import annotations

import struct
from pathlib import Path

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class HeaderError(ValueError):
    """The file is not a GGUF file sinkchat can read (the message says why, in one line)."""


def read(path: str | Path) -> dict:
    """Every scalar and string of the file's metadata, by key (arrays are skipped: ``None``).
    Raises :class:`HeaderError` for a file that is not GGUF or is cut short."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        try:
            return _read(f, size)
        except (struct.error, UnicodeDecodeError, OverflowError, ValueError) as exc:
            if isinstance(exc, HeaderError):
                raise
            raise HeaderError("its metadata is damaged or cut short") from None


def _read(f, size: int) -> dict:
    if f.read(4) != b"GGUF":
        raise HeaderError("it is not a GGUF file (no GGUF magic)")
    (version,) = struct.unpack("<I", f.read(4))
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not one sinkchat reads (2 or 3)")
    _, count = struct.unpack("<QQ", f.read(16))
    out: dict = {}
    for _ in range(count):
        key = _string(f, size)
        (kind,) = struct.unpack("<I", f.read(4))
        out[key] = _value(f, kind, size)
    return out


def _skip(f, n: int, size: int) -> None:
    """Seek ``n`` bytes on, within the file (a damaged length must not seek past it)."""
    if n > size - f.tell():
        raise struct.error("cut short")
    f.seek(n, 1)


def _string(f, size: int) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - f.tell():
        raise struct.error("cut short")
    return f.read(n).decode("utf-8")


def _value(f, kind: int, size: int):
    if kind in SCALARS:
        fmt = SCALARS[kind]
        (value,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
        return value
    if kind == STRING:
        return _string(f, size)
    if kind == ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in SCALARS:
            _skip(f, n * struct.calcsize(SCALARS[item]), size)
        elif item == STRING:
            if n > size:  # each element takes 8 bytes at least
                raise struct.error("cut short")
            for _ in range(n):
                (length,) = struct.unpack("<Q", f.read(8))
                _skip(f, length, size)
        else:
            raise HeaderError(f"an array of GGUF value type {item} is not one sinkchat reads")
        return None
    raise HeaderError(f"GGUF value type {kind} is not one sinkchat reads")
