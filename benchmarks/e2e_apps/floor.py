"""The floor: the weights already on local disk (BENCH_E2E_WEIGHTS), loaded at import."""

from __future__ import annotations

import os

from mangum import Mangum

from benchmarks.e2e_apps.common import load_local, plain_app

module = load_local(os.environ["BENCH_E2E_WEIGHTS"])
handler = Mangum(plain_app(module), lifespan="off")
