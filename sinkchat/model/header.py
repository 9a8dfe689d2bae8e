"""A GGUF file's header: its metadata and the list of its tensors, read without the tensors themselves.
The one GGUF parser here: the checks before anything is converted read the metadata (:func:`read`),
:class:`~.gguf.GGUFFile` the tensor list too (:func:`read_all`).

Why not ``gguf.GGUFReader``: it materialises every array element as a field (a 262,144-entry
vocabulary included), 4 to 60 s for the small files measured here, where sinkchat needs a few numbers
and the tensors' places. This walks the memory-mapped file once with ``struct`` (GGUF v2/v3 layout:
``GGUF``, version, tensor count, key count, then ``key, type, value``, then each tensor's name,
dimensions, block type and offset; gguf-py's ``gguf_reader.py`` and ggml's ``docs/gguf.md`` describe
it), keeps the scalars and strings and skips arrays by their sizes (string arrays element by element
in a tight loop, without decoding them): 0.07 s for Gemma 3 270M's header. No torch, no numpy.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
CUT = "truncated or damaged: a value runs past the end of the file"


class HeaderError(ValueError):
    """The file is not a GGUF file sinkchat can read (the message says why, in one line)."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header lists it: ``dims`` innermost first (GGUF's order), ggml's block type
    number, and where its data starts (from the file's start, alignment applied)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    start: int


def read(path: str | Path) -> dict:
    """Every scalar and string of the file's metadata, by key (arrays are skipped: ``None``).
    Raises :class:`HeaderError` for a file that is not GGUF or is cut short, ``OSError`` for one
    that cannot be opened."""
    data = _map(path)
    try:
        return _metadata(_Cursor(data))
    finally:
        data.close()


def read_all(path: str | Path) -> tuple[dict, list[TensorInfo], mmap.mmap]:
    """The metadata (:func:`read`), the tensor list, and the file's memory map (the tensors' bytes;
    kept open for as long as anything reads them). Raises :class:`HeaderError`."""
    data = _map(path)
    try:
        c = _Cursor(data)
        fields = _metadata(c)
        infos = []
        for _ in range(c.count(c.n_tensors, 24)):  # name length, dimensions, type, offset
            name = c.string()
            dims = tuple(c.scalar("<Q") for _ in range(c.count(c.scalar("<I"), 8)))
            infos.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
        align = fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1:
            raise HeaderError(f"its alignment is not a positive integer (got {align!r})")
        body = -(-c.at // align) * align
        return fields, [TensorInfo(n, d, t, body + o) for n, d, t, o in infos], data
    except BaseException:
        data.close()
        raise


def _map(path: str | Path) -> mmap.mmap:
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise HeaderError("not a GGUF file (it is empty)") from None


def _metadata(c: _Cursor) -> dict:
    if bytes(c.data[c.skip(4) : c.at]) != MAGIC:
        raise HeaderError("not a GGUF file (no GGUF magic)")
    version = c.scalar("<I")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    c.n_tensors, n_fields = c.scalar("<Q"), c.scalar("<Q")
    fields = {}
    for _ in range(c.count(n_fields, 13)):  # a key takes 12 bytes and a value one at least
        key = c.string()
        fields[key] = c.value(c.scalar("<I"))
    return fields


class _Cursor:
    """Reads little-endian values from a file's bytes, checking each lies inside (``struct`` on the
    memory map)."""

    def __init__(self, data):
        self.data, self.at, self.n_tensors = data, 0, 0

    def skip(self, n: int) -> int:
        """Move past ``n`` bytes; returns where they start."""
        if n < 0 or self.at + n > len(self.data):
            raise HeaderError(CUT)
        self.at += n
        return self.at - n

    def count(self, n: int, least: int = 1) -> int:
        """``n`` items of ``least`` bytes or more each, if the rest of the file can hold them."""
        if n * least > len(self.data) - self.at:
            raise HeaderError(CUT)
        return n

    def scalar(self, kind: str):
        return struct.unpack_from(kind, self.data, self.skip(struct.calcsize(kind)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.data[self.skip(n) : self.at]).decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError("truncated or damaged: a name is not UTF-8") from None

    def value(self, vtype: int):
        """One metadata value; arrays are skipped, not decoded (None)."""
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise HeaderError(f"GGUF value type {vtype} is not one sinkchat reads")
        etype, count = self.scalar("<I"), self.scalar("<Q")
        if etype in SCALARS:
            self.skip(count * struct.calcsize(SCALARS[etype]))
        elif etype == STRING:  # the vocabulary: a tight loop over the lengths
            self.count(count, 8)
            at, length, end = self.at, struct.Struct("<Q").unpack_from, len(self.data)
            for _ in range(count):
                if at + 8 > end:
                    raise HeaderError(CUT)
                at += 8 + length(self.data, at)[0]
            self.skip(at - self.at)  # the last string's end
        elif etype == ARRAY:
            for _ in range(self.count(count, 12)):
                self.value(etype)
        else:
            raise HeaderError(f"an array of GGUF value type {etype} is not one sinkchat reads")
        return None
