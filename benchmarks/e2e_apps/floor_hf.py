"""The transformers floor: `AutoModel.from_pretrained` of the directory on local disk
(BENCH_E2E_HF_DIR) at import, as a transformers user writes it."""

from __future__ import annotations

import os

from mangum import Mangum
from transformers import AutoModel

from benchmarks.e2e_apps.hf_common import plain_app

module = AutoModel.from_pretrained(os.environ["BENCH_E2E_HF_DIR"], local_files_only=True).eval()
handler = Mangum(plain_app(module), lifespan="off")
