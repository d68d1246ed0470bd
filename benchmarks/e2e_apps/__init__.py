"""Lambda functions for benchmarks.e2e: one module per way of getting the weights, all serving
the same model behind the same FastAPI app (common.py)."""
