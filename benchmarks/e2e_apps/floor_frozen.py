"""The floor with the one thing lazyserve's Service does to the interpreter at INIT: `gc.freeze()`
once the imports are done, so the collector stops walking torch's ~200,000 objects during the
rest of INIT (see README "Where inference runs, and the garbage collector")."""

from __future__ import annotations

import gc
import os

from mangum import Mangum

from benchmarks.e2e_apps.common import load_local, plain_app

gc.freeze()
module = load_local(os.environ["BENCH_E2E_WEIGHTS"])
handler = Mangum(plain_app(module), lifespan="off")
