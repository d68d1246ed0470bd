"""What a typical user writes: at import, boto3 `download_file`s the weights to /tmp, then
loads them as the floor does. BENCH_E2E_S3_URI names the object, BENCH_E2E_DOWNLOAD_TO the file."""

from __future__ import annotations

import os

import boto3
from mangum import Mangum

from benchmarks.e2e_apps.common import load_local, plain_app

bucket, _, key = os.environ["BENCH_E2E_S3_URI"].removeprefix("s3://").partition("/")
path = os.environ["BENCH_E2E_DOWNLOAD_TO"]
boto3.client("s3").download_file(bucket, key, path)
module = load_local(path)
handler = Mangum(plain_app(module), lifespan="off")
