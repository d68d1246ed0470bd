"""Getting weights ready to serve: `.pt` state dicts to safetensors, and uploads to S3 that
store the digest every later load verifies."""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lazyserve.errors import ModelFetchError, ModelFormatError
from lazyserve.settings import parse_model_uri
from lazyserve.sources import s3_client
from lazyserve.types import S3Client

__all__ = ["Pushed", "convert", "file_sha256", "push"]

PART_SIZE = 8 * 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(PART_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


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


def push(
    path: Path, uri: str, *, client: S3Client | None = None, progress: IO[str] | None = None
) -> Pushed:
    """Upload `path` to `s3://bucket/key` (multipart above 8 MiB) with its sha256 stored as
    object metadata (`x-amz-meta-sha256`), which loads then verify without configuration."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        target = parse_model_uri(uri)
    except ValueError:
        target = None  # the forms a load accepts besides S3 are no use here either
    if target is None or not target.is_s3 or target.version_id is not None:
        raise ValueError(f"push needs s3://bucket/key without a versionId, got {uri!r}")
    s3 = client if client is not None else s3_client()
    size = path.stat().st_size
    digest = file_sha256(path)
    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    bucket, key = target.bucket or "", target.key or ""
    try:
        s3.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": {"sha256": digest}},
            Config=config,
            Callback=_Progress(size, progress if progress is not None else sys.stderr),
        )
        head = s3.head_object(Bucket=bucket, Key=key)
    # upload_file wraps the ClientError of a failed PutObject or multipart upload in boto3's
    # S3UploadFailedError, which is neither a ClientError nor a BotoCoreError.
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        raise ModelFetchError(f"cannot upload to {uri}: {exc}") from exc
    if head.get("Metadata", {}).get("sha256") != digest:
        raise ModelFetchError(f"{uri}: the stored sha256 does not match the file's {digest}")
    return Pushed(uri, digest, size, head.get("VersionId"))


def convert(source: Path, target: Path) -> int:
    """Turn a `.pt` state dict (read with weights_only=True) into a safetensors file; return
    the number of tensors written."""
    import torch
    from safetensors.torch import save_file

    from lazyserve.formats import read_state_dict
    from lazyserve.sources import Weights

    state = read_state_dict(Weights(str(source), source.stat().st_size, "", path=source))
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
    save_file(tensors, str(target), metadata={"converted_from": source.name})
    return len(tensors)
