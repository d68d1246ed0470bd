"""torch.save files, looked at before torch.load(weights_only=True) reads them (a zip archive's
directory, a legacy file's pickles: no record that inflates, none that shares another's bytes,
nothing that would take more memory than the read may use), and torch.load's failures told in
lazyserve's own words."""

from __future__ import annotations

import io
import logging
import mmap
import pickle
import pickletools
import re
import struct
import zipfile
from typing import IO, cast

from lazyserve.errors import ModelFormatError
from lazyserve.headroom import Headroom

__all__ = ["DAMAGED", "MemoryReader", "Source", "check_archive", "check_legacy", "failure"]

log = logging.getLogger("lazyserve")

DAMAGED = "cannot read this torch.save file, it is damaged or truncated"

# What torch.load holds per unit, beyond the tensors' bytes, measured on CPython 3.11: a tensor
# costs 750-1,400 bytes and torch.save spends 75-100 bytes of pickle on one, a pickle written
# by hand as little as about 25; zipfile's ZipInfo and torch's own index of a record, about 1 KiB.
_PICKLE_BYTES = 40  # per byte of pickle
_RECORD_BYTES = 1024  # per record of a zip archive's directory

_END = b"PK\x05\x06"  # the end of central directory record
_END64_LOCATOR = b"PK\x06\x07"
_END64 = b"PK\x06\x06"
_END_SIZE = 22
_LOCAL_HEADER = 30  # a record's local header before its name
_DIRECTORY_RECORD = 46  # a record's entry in the directory before its name


class MemoryReader(io.RawIOBase):
    """A seekable, read-only file over bytes already in memory, for zipfile and torch.load:
    io.BytesIO would first copy them. `close()` releases the buffer."""

    def __init__(self, buffer: bytearray | mmap.mmap | bytes) -> None:
        super().__init__()
        self._buffer = buffer  # for find(): memoryview has none
        self._view = memoryview(buffer)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, into: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._view[self._pos : self._pos + len(into)]
        memoryview(into).cast("B")[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int | None = -1) -> bytes:
        # RawIOBase.read would allocate `size` bytes first: a pickle can ask for 2**63.
        end = self._end(size)
        chunk = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        # IOBase.readline reads a byte a call: a pickle's line can be a hundred megabytes long.
        end = self._end(size)
        newline = self._buffer.find(b"\n", self._pos, end)
        return self.read((end if newline < 0 else newline + 1) - self._pos)

    def _end(self, size: int | None) -> int:
        whole = len(self._view)
        return whole if size is None or size < 0 else min(self._pos + size, whole)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if start + offset < 0:
            raise ValueError("negative seek position")
        self._pos = start + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


# What the checks read: the bytes in memory, or the file a caller named. (Both are binary files
# to the standard library and torch; typeshed's IO[bytes] is a class neither inherits.)
Source = MemoryReader | io.BufferedReader


def check_archive(uri: str, source: Source, size: int, *, headroom: Headroom) -> None:
    """Refuse a torch.save zip archive whose records torch.load should not read: a compressed
    record (torch.save stores every record as it is: one that inflates is a zip bomb), a record
    that overlaps another, or reading that would take more memory than `headroom` (torch.load
    copies every record it reads)."""

    def bad(reason: str) -> ModelFormatError:
        return ModelFormatError(f"{uri}: {reason}")

    directory = _directory_size(source, size)
    if directory is None:
        raise bad(f"{DAMAGED} (the zip archive's directory is missing)")
    headroom.need(
        _RECORD_BYTES * (directory // _DIRECTORY_RECORD),
        f"its zip directory of {directory:,} bytes",
    )
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        log.debug("zipfile refused %s: %r", uri, exc)
        raise bad(f"{DAMAGED} (the zip archive's directory is damaged)") from None
    with archive:
        infos = archive.infolist()
        _check_records(uri, infos, size, headroom=headroom)
        for info in infos:
            if info.filename.rsplit("/", 1)[-1] == "data.pkl":
                try:
                    pickled = archive.read(info)
                except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                    log.debug("zipfile cannot read %s of %s: %r", info.filename, uri, exc)
                    raise bad(f"{DAMAGED} (its pickle record is damaged)") from None
                _check_pickles(uri, io.BytesIO(pickled), 1)


def _check_records(
    uri: str, infos: list[zipfile.ZipInfo], size: int, *, headroom: Headroom
) -> None:
    def bad(reason: str) -> ModelFormatError:
        return ModelFormatError(f"{uri}: {reason}")

    records = len(infos)
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(
                f"refused: record {_show(info.filename)} is compressed (zip method "
                f"{info.compress_type}); torch.save stores every record uncompressed, and a "
                "compressed one can inflate to any size"
            )
        if info.file_size != info.compress_size:
            raise bad(f"{DAMAGED} (record {_show(info.filename)} has two different sizes)")
    # Each record's bytes must lie after its header and before the next record, so that
    # together they hold no more than the file: records sharing bytes would each be read.
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end:
            raise bad(f"refused: record {_show(info.filename)} overlaps the record before it")
        end = info.header_offset + _LOCAL_HEADER + info.compress_size
        if end > size:
            raise bad(f"{DAMAGED} (record {_show(info.filename)} runs past the end of the file)")
    pickled = sum(i.file_size for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl")
    copied = sum(i.file_size for i in infos)
    headroom.need(
        _RECORD_BYTES * records + _PICKLE_BYTES * pickled + copied,
        f"it ({records:,} records, {pickled:,} bytes of pickle, {copied:,} bytes of records)",
    )


def check_legacy(uri: str, source: Source, size: int, *, headroom: Headroom) -> None:
    """Refuse a legacy torch.save file (five pickles, then the storages' bytes) whose reading
    would take more memory than `headroom`: torch.load copies the storages into memory, and a
    pickle can describe many tensors in few bytes."""
    # The magic number, the protocol version, the system's description, the object, the keys
    # of its storages.
    source.seek(0)
    _check_pickles(uri, source, 5)
    pickled = source.tell()
    headroom.need(
        _PICKLE_BYTES * pickled + (size - pickled),
        f"it ({pickled:,} bytes of pickle, {size - pickled:,} bytes of storages)",
    )


# A global's module and name, as the pickle's GLOBAL opcode spells them: torch's own are under
# a hundred characters. (torch.load's message about a refused global goes through regular
# expressions that take time growing with the square of its length: a megabyte takes hours.)
_LONGEST_GLOBAL = 1000


def _check_pickles(uri: str, source: Source | io.BytesIO, count: int) -> None:
    """Read `count` pickles from `source` to their STOP with pickletools, which makes no object:
    refuse one that is damaged, or that names a global longer than any torch can mean."""
    try:
        for _ in range(count):
            for op, arg, _pos in pickletools.genops(cast(IO[bytes], source)):
                if op.name in ("GLOBAL", "INST") and len(str(arg)) > _LONGEST_GLOBAL:
                    raise ModelFormatError(
                        f"{uri}: refused: not a plain state dict (its pickle names a global of "
                        f"{len(str(arg)):,} characters)"
                    )
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        log.debug("the pickles of %s are damaged: %r", uri, exc)
        raise ModelFormatError(f"{uri}: {DAMAGED} (its pickles are cut short or damaged)") from None


def failure(uri: str, exc: Exception) -> ModelFormatError:
    """torch.load's exception `exc` as lazyserve's ModelFormatError: what was refused (the
    global or opcode a weights_only load refused, cut short) or that the file is damaged;
    torch's own text, which can be long and name paths and library addresses, goes to the
    `lazyserve` log at DEBUG only."""
    text = str(exc)
    log.debug("torch.load of %s failed: %s: %s", uri, type(exc).__name__, text[:2000])
    if isinstance(exc, pickle.UnpicklingError):
        # weights_only=True raises UnpicklingError for what it refuses, and only then.
        return ModelFormatError(
            f"{uri}: refused: not a plain state dict (torch.load weights_only=True: "
            f"{_refused(text)})"
        )
    if isinstance(exc, EOFError):
        return ModelFormatError(f"{uri}: {DAMAGED} (it ends in the middle of a pickle)")
    return ModelFormatError(f"{uri}: {DAMAGED} (torch.load raised {type(exc).__name__})")


def _refused(text: str) -> str:
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"whose module (\S+) is blocked", text)
    if found:
        return f"it names GLOBAL {_printable(found[1])}, which is not allowed"
    found = re.search(r"Unsupported operand (\d{1,3})\b", text)
    if found:
        return f"pickle opcode {found[1]} is not allowed"
    return "it holds objects other than tensors and plain containers"


def _printable(name: str) -> str:
    # The name comes from the file: printable ASCII only, cut short.
    cut = re.sub(r"[^\x21-\x7e]", "?", name[:60])
    return cut + ("..." if len(name) > 60 else "")


def _show(name: str) -> str:
    return repr(name[:60]) + ("..." if len(name) > 60 else "")


def _directory_size(source: Source, size: int) -> int | None:
    """The size of the zip archive's directory, from its end record (None when it has none):
    zipfile, then torch, make an object of every record it lists, and a record takes 46 bytes
    of it at least."""
    tail_size = min(size, _END_SIZE + 0xFFFF)  # the end record, and a comment of 64 KiB at most
    source.seek(size - tail_size)
    tail = source.read(tail_size)
    at = tail.rfind(_END)
    if at < 0 or at + _END_SIZE > len(tail):
        return None
    (directory,) = struct.unpack_from("<I", tail, at + 12)
    if directory != 0xFFFFFFFF:
        return int(directory)
    # A zip64 archive: its locator, just before the end record, says where its own end is.
    if at < 20 or tail[at - 20 : at - 16] != _END64_LOCATOR:
        return None
    (where,) = struct.unpack_from("<Q", tail, at - 12)
    if where > size - 56:
        return None
    source.seek(where)
    end64 = source.read(56)
    if end64[:4] != _END64:
        return None
    (directory64,) = struct.unpack_from("<Q", end64, 40)
    return int(directory64)
