# The lazyserve reference function as an AWS Lambda container image (`sam build` builds it).
#
# Not built by this repository's tests: the development machines have no Docker engine.
# tests/test_template.py checks what it can without one: the base image, that every COPY
# source exists, and the CMD.
FROM public.ecr.aws/lambda/python:3.13

# CPU-only torch from PyTorch's own index (PyPI's x86_64 wheel pulls in GBs of CUDA), in a
# layer of its own: the largest and least often changed one, so code edits leave it cached.
# constraints.txt is the single place the torch version is pinned.
COPY constraints.txt /tmp/lazyserve/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        -c /tmp/lazyserve/constraints.txt torch

# The library, non-editable, with its other dependencies from PyPI; the constraint keeps pip
# from replacing the CPU torch installed above.
COPY pyproject.toml README.md /tmp/lazyserve/
COPY src/ /tmp/lazyserve/src/
RUN pip install --no-cache-dir -c /tmp/lazyserve/constraints.txt /tmp/lazyserve \
    && rm -rf /tmp/lazyserve

# The reference function (and its weights, for a local-file LAZYSERVE_MODEL_URI). The function
# runs as a non-root user: a file written under a restrictive umask (0600, as safetensors'
# save_file leaves it under umask 077) keeps that mode through COPY and could not be read, so
# everything in the task root is made world-readable.
COPY handler/ ${LAMBDA_TASK_ROOT}/handler/
RUN chmod -R a+rX ${LAMBDA_TASK_ROOT}

CMD ["handler.app.handler"]
