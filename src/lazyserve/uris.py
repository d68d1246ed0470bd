"""Model URIs: `s3://bucket/key[?versionId=V]`, `file:///abs/path`, a plain path, or any of them
ending in `/` for a prefix of many models. Standard library only: the download helper started
with the interpreter parses the URI before anything heavy is imported."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote

__all__ = ["MODEL_SUFFIX", "NAME_RULE", "URI_FORMS", "ModelURI", "parse_model_uri"]

URI_FORMS = (
    "s3://bucket/key, s3://bucket/key?versionId=V, file:///abs/path or a plain path "
    "(ending in / for a prefix of many models)"
)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986, as urllib.parse reads it
_VERSION = "?versionId="
# A `?` followed by NAME= inside a key reads as a query parameter; only versionId is one.
_QUERY_LIKE = re.compile(r"\?([A-Za-z0-9_.-]+)=")
_BUCKET = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{1,253})[A-Za-z0-9]")
BUCKET_RULE = (
    "3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter "
    "or digit (buckets made in us-east-1 before March 2018 may also hold capitals and "
    "underscores, up to 255)"
)
_MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 encoding
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
NAME_RULE = "ASCII letters, digits, '-', '_' and '.', not starting with '.'"
MODEL_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelURI:
    """Where the weights live: an S3 object (optionally one version), a local file, or a
    prefix (ending in `/`) under which each model NAME is `NAME.safetensors`."""

    uri: str
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def is_prefix(self) -> bool:
        """A prefix of many models (the URI ends in `/`), not one weights file."""
        if self.key is not None:
            return self.key == "" or self.key.endswith("/")
        return self.uri.endswith(("/", os.sep))

    @property
    def suffix(self) -> str:
        name = self.key if self.key is not None else str(self.path)
        return PurePosixPath(name).suffix.lower()

    @property
    def format(self) -> Literal["pt", "safetensors"]:
        """The weights format, from the name: `pt` for `.pt`/`.pth`, else `safetensors`."""
        return "pt" if self.suffix in (".pt", ".pth") and not self.is_prefix else "safetensors"

    def for_model(self, name: str, *, directory: bool = False) -> ModelURI:
        """Model `name` under this prefix: the weights file `<prefix>NAME.safetensors`, or the
        model directory `<prefix>NAME/` (transformers' save_pretrained layout)."""
        if not self.is_prefix:
            raise ValueError(f"{self.uri} names one weights file, not a prefix (one ends in /)")
        if not _NAME.fullmatch(name):
            raise ValueError(f"model name {_shown(name)} is not accepted: use {NAME_RULE}")
        try:
            return self.child(name + ("/" if directory else MODEL_SUFFIX))
        except ValueError:
            raise ValueError(
                f"model name {_shown(name)} makes the key longer than S3's {_MAX_KEY_BYTES} bytes"
            ) from None

    def child(self, name: str) -> ModelURI:
        """The object or file `name` (a relative, `/`-separated name) under this prefix."""
        file = name
        if self.key is not None:
            key = self.key + file
            if len(key.encode()) > _MAX_KEY_BYTES:
                raise ValueError(f"{_shown(key)} is longer than S3's {_MAX_KEY_BYTES} bytes")
            return ModelURI(f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)
        assert self.path is not None
        uri = self.uri if self.uri.endswith(("/", os.sep)) else self.uri + "/"
        return ModelURI(uri + file, path=self.path / file)


def _shown(value: str) -> str:
    """`value` quoted for a message, cut to 80 characters: a message stays small whatever it
    quotes."""
    return repr(value if len(value) <= 80 else value[:80] + "...")


def parse_model_uri(uri: str) -> ModelURI:
    """Parse `s3://bucket/key[?versionId=V]`, `file:///abs/path` or a plain path; see
    `_parse_s3` for how keys are read (literally)."""
    if not uri.strip():
        raise ValueError(f"must not be empty; accepted: {URI_FORMS}")
    scheme = _SCHEME.match(uri)
    # One-letter "schemes" are Windows drive letters, i.e. plain paths.
    if scheme is None or len(scheme[1]) == 1:
        return ModelURI(uri, path=Path(uri))
    name = scheme[1].lower()
    rest = uri[scheme.end() :]
    if name == "s3":
        return _parse_s3(uri, rest)
    if name == "file":
        return _parse_file(uri, rest)
    raise ValueError(f"scheme {_shown(scheme[1])} is not supported; accepted: {URI_FORMS}")


def _parse_s3(uri: str, rest: str) -> ModelURI:
    # By hand, not urllib.parse: a key is taken literally (`#`, `%`, `+`, `//`, spaces), and a
    # version id keeps its `+` (AWS's own example ids hold some). The rule: the bucket runs to
    # the first `/`; the key is everything after it up to the LAST `?versionId=`, whose value
    # runs to the end. A version id never holds `?`, so the split is unambiguous; a key that
    # holds `?NAME=` (NAME of letters, digits, `-`, `_`, `.`) would read as a query
    # parameter, so it is refused rather than guessed at.
    if not rest.startswith("//"):
        raise ValueError(f"an s3 URI starts with s3://; accepted: {URI_FORMS}")
    bucket, slash, key = rest[2:].partition("/")
    if bucket.lower().startswith("arn:"):
        raise ValueError(
            "ARNs (access points, Outposts, Object Lambda) are not supported as the bucket; "
            "give the access point's alias (it ends in -s3alias) as the bucket instead"
        )
    if not bucket:
        raise ValueError(f"an s3:// URI needs a bucket and a key; accepted: {URI_FORMS}")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"bucket {_shown(bucket)} is not a valid S3 bucket name: {BUCKET_RULE}")
    if not slash:
        raise ValueError(
            f"an s3:// URI needs a key after the bucket (s3://{bucket}/key), or a / for a "
            f"prefix of many models (s3://{bucket}/)"
        )
    version: str | None = None
    at = key.rfind(_VERSION)
    if at >= 0:
        key, version = key[:at], key[at + len(_VERSION) :]
        if not version:
            raise ValueError("versionId is empty; drop it or give the object's version id")
        if any(c == "?" or c.isspace() or not c.isprintable() for c in version):
            raise ValueError(
                f"versionId {_shown(version)} is not an S3 version id (no '?', spaces or "
                "control characters)"
            )
        if len(version.encode()) > _MAX_KEY_BYTES:
            raise ValueError(f"versionId is longer than S3's {_MAX_KEY_BYTES} bytes")
    query = _QUERY_LIKE.search(key)
    if query:
        raise ValueError(
            f"the only query parameter accepted is versionId, once, at the end "
            f"(s3://bucket/key?versionId=V), got {_shown(query[0])}"
        )
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ValueError("the key is not valid Unicode (a lone surrogate)") from None
    if size > _MAX_KEY_BYTES:
        raise ValueError(f"the key is {size} bytes; S3 keys are at most {_MAX_KEY_BYTES}")
    parsed = ModelURI(uri, bucket=bucket, key=key, version_id=version)
    if parsed.is_prefix and version is not None:
        raise ValueError("a versionId pins one object; a URI ending in / names many models")
    return parsed


def _parse_file(uri: str, rest: str) -> ModelURI:
    # RFC 8089: file:///abs, file://localhost/abs or file:/abs, percent-encoded as
    # Path.as_uri() writes it; `?` and `#` are part of the path, not a query or fragment.
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(
                f"a file:// URI names a local absolute path (file:///abs/path); accepted: "
                f"{URI_FORMS}"
            )
        path = "/" + path
    elif rest.startswith("/"):
        path = rest
    else:
        raise ValueError(
            f"a file: URI names an absolute path (file:///abs/path), got {_shown(uri)}"
        )
    return ModelURI(uri, path=Path(unquote(path)))
