"""Getting weights ready to serve: `.pt` state dicts to safetensors, and uploads to S3 that
store the digest every later load verifies."""

from __future__ import annotations

import hashlib
import mmap
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from lazyserve.errors import ModelFetchError, ModelFormatError
from lazyserve.sources import s3_client
from lazyserve.types import S3Client
from lazyserve.uris import MODEL_SUFFIX, ModelURI, parse_model_uri

__all__ = [
    "Pushed",
    "PushedDirectory",
    "check_weights_file",
    "convert",
    "file_digests",
    "push",
    "push_directory",
]

PART_SIZE = 8 * 1024 * 1024


def file_digests(path: Path, *, crcs: bool = True) -> dict[str, str]:
    """The metadata push stores with a file, in one read: its sha256 (hex) and the CRCs this
    process computes (base64, as S3 writes them; see sources/checksums.py)."""
    from lazyserve.sources.checksums import Crc, available

    digest = hashlib.sha256()
    running = [Crc(name) for name in available()] if crcs else []
    with open(path, "rb") as file:
        while chunk := file.read(PART_SIZE):
            digest.update(chunk)
            for crc in running:
                crc.update(chunk)
    return {"sha256": digest.hexdigest(), **{crc.name: crc.b64digest() for crc in running}}


@dataclass(frozen=True)
class Pushed:
    uri: str
    sha256: str
    size: int
    version_id: str | None


class _Progress:
    """A one-line progress bar; boto3 calls it from its upload threads."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total, self.done, self.out = total, 0, out
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            share = self.done / self.total if self.total else 1.0
            bar = "#" * int(share * 30)
            self.out.write(
                f"\r[{bar:<30}] {share:6.1%} {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
            )
            if self.done >= self.total:
                self.out.write("\n")
            self.out.flush()

    def abandon(self) -> None:
        """End a partly drawn bar with a newline, so the error that follows has its own line."""
        with self._lock:
            if 0 < self.done < self.total:
                self.out.write("\n")
                self.out.flush()
            self.done = self.total


def _existing_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise IsADirectoryError(f"{path}: not a file")


def check_weights_file(path: Path, expected: Literal["pt", "safetensors"]) -> None:
    """Raise ModelFormatError unless `path` is a readable weights file of format `expected`
    (`safetensors` or `pt`), checked by the same reader a load uses (weights_only for `.pt`),
    without reading the tensors' data."""
    from lazyserve.formats import read_state_dict, sniff_format
    from lazyserve.sources import Weights

    name = str(path)
    with open(path, "rb") as file:
        head = file.read(16)
        size = file.seek(0, 2)
    if size == 0:
        raise ModelFormatError(f"{name}: the file is empty")
    found = sniff_format(head)
    if found is None:
        raise ModelFormatError(
            f"{name} is not a weights file: it starts with {head[:8]!r}, which is neither "
            "safetensors (an 8-byte header length, then a JSON header) nor torch.save"
        )
    if expected == "safetensors" and found == "pt":
        raise ModelFormatError(
            f"{name} is a torch.save file, not safetensors: convert it first "
            f"(lazyserve convert {path} OUT.safetensors), or give the key a .pt suffix"
        )
    if expected == "pt" and found == "safetensors":
        raise ModelFormatError(
            f"{name} is a safetensors file, not a torch.save file: give the key a "
            ".safetensors suffix"
        )
    if expected == "pt":
        read_state_dict(Weights(name, size, "", path=path), format="pt")
        return
    # A private, copy-on-write map: the tensors become views without reading their pages, so
    # checking a multi-GB file reads little more than its header.
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        state = read_state_dict(Weights(name, size, "", buffer=buffer), format="safetensors")
        del state
    finally:
        try:
            buffer.close()
        except BufferError:  # a view outlived `state`; the map closes when it is collected
            pass


def push(
    path: Path, uri: str, *, client: S3Client | None = None, progress: IO[str] | None = None
) -> Pushed:
    """Upload `path` to `s3://bucket/key` (multipart above 8 MiB) with its sha256 stored as
    object metadata (`x-amz-meta-sha256`) and its CRCs beside it (`x-amz-meta-crc32`, and
    `-crc64nvme` with awscrt), which loads then check without configuration (sources/checksums.py
    says why a CRC).

    The file is checked first (a weights file of the format its key names), then the bucket;
    only a multipart upload that is under way draws progress, on `progress` (by default stderr,
    when it is a terminal). A URI ending in `/` is a prefix of many models: the file lands at
    `<prefix><file name>`."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{path}: a directory: push_directory() uploads a save_pretrained directory"
        )
    accepted = "s3://bucket/key or s3://bucket/prefix/, without a versionId"
    target = _target(uri, accepted)
    if target.version_id is not None:
        raise ValueError(f"push needs {accepted} (S3 gives the upload its own); got {uri!r}")
    if target.is_prefix:
        if path.suffix != MODEL_SUFFIX:
            raise ValueError(
                f"{uri} is a prefix of models, which are NAME{MODEL_SUFFIX} files; "
                f"{path.name} is not one: convert it or give the full key"
            )
        try:
            target = target.for_model(path.name.removesuffix(MODEL_SUFFIX))
        except ValueError as exc:
            raise ValueError(f"{path.name} cannot go under the prefix {uri}: {exc}") from None
    _existing_file(path)
    check_weights_file(path, target.format)
    s3 = client if client is not None else s3_client()
    _check_bucket(s3, target.bucket or "")
    return _upload(s3, path, target, progress)


def _upload(s3: S3Client, path: Path, target: ModelURI, progress: IO[str] | None) -> Pushed:
    """One file to `target`, its sha256 stored with it and checked after."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = target.bucket or "", target.key or ""
    size = path.stat().st_size
    metadata = file_digests(path)
    digest = metadata["sha256"]
    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    # Below the multipart threshold the upload is one PutObject: its bytes are "sent" before S3
    # answers, so a bar would fill up and then the upload fail. Multipart parts only start once
    # CreateMultipartUpload succeeded, so their progress is real. By default the bar goes to a
    # terminal only: in a pipe or a log file its carriage returns are one line of clutter.
    out = progress if progress is not None else (sys.stderr if sys.stderr.isatty() else None)
    bar = _Progress(size, out) if out is not None and size > PART_SIZE else None
    try:
        s3.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": metadata},
            Config=config,
            Callback=bar,
        )
        head = s3.head_object(Bucket=bucket, Key=key)
    # upload_file wraps the ClientError of a failed PutObject or multipart upload in boto3's
    # S3UploadFailedError, which is neither a ClientError nor a BotoCoreError.
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        if bar is not None:
            bar.abandon()
        raise ModelFetchError(f"cannot upload to {target.uri}: {exc}") from exc
    if head.get("Metadata", {}) != metadata:
        raise ModelFetchError(
            f"{target.uri}: the digests stored with the object do not match the file's "
            f"(sha256 {digest})"
        )
    return Pushed(target.uri, digest, size, head.get("VersionId"))


@dataclass(frozen=True)
class PushedDirectory:
    uri: str
    files: list[Pushed]
    weights: tuple[str, ...]  # the names of the weights files among them


def push_directory(
    path: Path, uri: str, *, client: S3Client | None = None, progress: IO[str] | None = None
) -> PushedDirectory:
    """Upload a transformers save_pretrained directory to `s3://bucket/dir/`: every file (the
    chat templates' sub-directory too), each with its sha256 stored as object metadata, which
    loads verify. Refused before any upload when it has no config.json or no weights, or a
    weights file is not a valid safetensors (or weights_only `.bin`) file."""
    from lazyserve.checkpoint import pretrained_files, read_shard_index

    accepted = "s3://bucket/dir/ (ending in /), without a versionId"
    target = _target(uri, accepted, " for a directory")
    if not target.is_prefix:
        raise ValueError(f"{path} is a directory: push it to {accepted}; got {uri!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    names = sorted(
        p.relative_to(path).as_posix()
        for p in [*path.iterdir(), *(path / "additional_chat_templates").glob("*")]
        if p.is_file()
    )
    files = pretrained_files(names, str(path))
    weights = files.weights
    if files.index is not None:
        weights = read_shard_index((path / files.index).read_bytes(), str(path / files.index)).files
        absent = [w for w in weights if w not in names]
        if absent:
            raise ModelFormatError(f"{path}: shards named by the index are missing: {absent[:5]}")
    for name in weights:
        check_weights_file(path / name, "safetensors" if name.endswith(".safetensors") else "pt")
    s3 = client if client is not None else s3_client()
    _check_bucket(s3, target.bucket or "")
    pushed = [_upload(s3, path / name, target.child(name), progress) for name in names]
    return PushedDirectory(target.uri, pushed, tuple(weights))


def _target(uri: str, accepted: str, what: str = "") -> ModelURI:
    """`uri` parsed, when it is an s3:// URI; ValueError naming what push accepts."""
    if not uri.lower().startswith("s3://"):
        raise ValueError(f"push needs {accepted}{what}; got {uri!r}")
    try:
        return parse_model_uri(uri)
    except ValueError as exc:
        raise ValueError(f"{uri!r} is not accepted: {exc}") from None


def _check_bucket(s3: S3Client, bucket: str) -> None:
    # HeadBucket before any byte is sent: a missing bucket fails at once, with S3's word for it.
    # A 403 is not final: HeadBucket needs s3:ListBucket, which an upload-only role may lack
    # while s3:PutObject would succeed; the upload then speaks for itself.
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise ModelFetchError(
                f"cannot upload to s3://{bucket}: S3 error NoSuchBucket (no bucket has that "
                "name; create it, or check the name and AWS_REGION)"
            ) from exc
        if status != 403:
            raise ModelFetchError(f"cannot upload to s3://{bucket}: {exc}") from exc
    except BotoCoreError as exc:
        raise ModelFetchError(f"cannot upload to s3://{bucket}: {exc}") from exc


def convert(source: Path, target: Path) -> int:
    """Turn a torch.save state dict (read with weights_only=True, whatever its name) into a
    safetensors file named `*.safetensors`, mode 0644; return the number of tensors written."""
    # The arguments are checked before torch is imported: a typo is answered at once, not after
    # the 2-3 s that import takes.
    _existing_file(source)
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError(f"{target} is the input file; give another output path")
    if target.suffix != MODEL_SUFFIX:
        # The format follows the name when the file is served or pushed: safetensors bytes
        # under a .pt name would be refused there as a broken torch.save file.
        raise ValueError(
            f"{target}: the output is a safetensors file, so its name must end in "
            f"{MODEL_SUFFIX} (serving and push read a name's suffix as its format); "
            f"e.g. {target.with_suffix(MODEL_SUFFIX)}"
        )
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from lazyserve.formats import read_state_dict, sniff_format
    from lazyserve.sources import Weights

    with open(source, "rb") as file:
        head = file.read(16)
    if sniff_format(head) == "safetensors":
        raise ModelFormatError(
            f"{source} is already a safetensors file: nothing to convert; push or serve it as it is"
        )
    state = read_state_dict(
        Weights(str(source), source.stat().st_size, "", path=source), format="pt"
    )
    # safetensors refuses tensors that share memory (tied weights): give each its own copy.
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        where = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        shared = where in seen or not tensor.is_contiguous()
        seen.add(where)
        tensors[name] = tensor.contiguous().clone() if shared else tensor
    if not tensors:
        raise ModelFormatError(f"{source}: the state dict holds no tensors")
    try:
        save_file(tensors, str(target), metadata={"converted_from": source.name})
    except SafetensorError as exc:  # the Rust writer's I/O errors arrive as this
        raise OSError(f"{target}: cannot write it: {exc}") from exc
    # save_file creates the file under the process's umask (0600 under umask 077): a file
    # copied into a Lambda image that way is unreadable to the function's non-root user.
    target.chmod(0o644)
    return len(tensors)
