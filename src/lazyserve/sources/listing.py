"""S3's ListObjectsV2 answers: what a listing holds, and its XML read with bounded patterns."""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Listed", "Listing", "parse_listing", "xml_field"]


class Listed(NamedTuple):
    """One object of a listing: its key, size and ETag."""

    key: str
    size: int
    etag: str | None


class Listing(NamedTuple):
    """What a ListObjectsV2 with a delimiter found under a prefix: the objects directly under
    it, and the common prefixes (the `directories`) below it."""

    objects: list[Listed]
    prefixes: list[str]


_CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.S)
_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>(.*?)</Prefix>", re.S)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&amp;": "&"}


def _unescape(text: str) -> str:
    return re.sub(r"&(?:lt|gt|quot|apos|amp);", lambda m: _ENTITIES[m.group()], text)


def xml_field(body: str, name: str) -> str | None:
    found = re.search(rf"<{name}>(.*?)</{name}>", body, re.S)
    return _unescape(found.group(1)) if found else None


def parse_listing(body: str) -> Listing:
    """A ListObjectsV2 page, read with a few bounded patterns (no XML parser: S3's answer is
    flat, and a hostile one cannot make entities expand here)."""
    objects = []
    for item in _CONTENTS.findall(body):
        key = xml_field(item, "Key")
        size = xml_field(item, "Size")
        if key is None or size is None or not size.isdigit():
            continue
        objects.append(Listed(key, int(size), xml_field(item, "ETag")))
    prefixes = [_unescape(p) for p in _PREFIX.findall(body)]
    return Listing(objects, prefixes)
