"""The Lambda side: one entry point for HTTP events (through Mangum), direct invocations, SQS
batches and warm-up pings; with a batched predict function, direct lists and SQS batches in as
few calls as their models allow."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from mangum.protocols import HTTPCycle
from pydantic import ValidationError

from lazyserve import timing
from lazyserve.error_handlers import bounded
from lazyserve.errors import (
    InvalidInput,
    LambdaEventError,
    ModelNotFound,
    ModelUnavailable,
    PredictFailed,
    UnsupportedEvent,
)
from lazyserve.logs import bind, request_id
from lazyserve.metrics import ModelMetrics
from lazyserve.types import LambdaContext, LambdaEvent
from lazyserve.workers import one_at_a_time

__all__ = ["BATCH_KEY", "Batched", "LambdaHandler", "invalid_input"]

log = logging.getLogger("lazyserve")

HTTP_SHAPES = (
    "an API Gateway REST (v1) or HTTP API (v2) request, a Function URL request, an ALB request"
)
WARMUP_SHAPE = '{} / {"warmup": true} to load the model'

Answer = Callable[[Mapping[str, Any]], Any]
BATCH_KEY = "batch"
"""`{"batch": [payload, ...]}`: a direct invocation of a batched predict function with many
payloads, answered `{"batch": [answer, ...]}` in the same order."""


EARLIER_FAILED = "an earlier message of its group failed"


@dataclass(frozen=True)
class Batched:
    """How a batched predict function answers many payloads: `prepare(payload)` validates one
    into `(model, request)` (or raises InvalidInput or ModelNotFound); `run(model, requests)`
    answers up to `max_size` of them in one call, in order (or raises ModelUnavailable,
    ModelNotFound, or what the function raised)."""

    prepare: Callable[[Mapping[str, Any]], tuple[Hashable, Any]]
    run: Callable[[Hashable, list[Any]], list[Any]]
    max_size: int


@dataclass(eq=False)
class _Job:
    """One payload of a direct list or an SQS batch, and what became of it."""

    label: str  # the SQS message id, or `batch[i]`
    key: Hashable = None
    request: Any = None
    group: Hashable = None  # a FIFO queue's message group
    answer: Any = None
    error: Exception | None = None
    quiet: bool = False  # failed without a line of its own: the call's line, or its group's


def _is_sqs(event: Mapping[str, Any]) -> bool:
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(
            isinstance(r, Mapping)
            and r.get("eventSource") == "aws:sqs"
            and isinstance(r.get("messageId"), str)
            for r in records
        )
    )


def _scope_problem(scope: Mapping[str, Any]) -> str | None:
    """What breaks the ASGI spec in a scope Mangum built, or None. Mangum copies the method and
    the client's address from the event without looking at them: a method that is an object
    makes Starlette's router raise (it hashes the method), a 500 for a bad event."""
    method = scope.get("method")
    if not isinstance(method, str) or not method:
        return f"the request method is {_json_kind(method)}, not a name such as POST"
    client = scope.get("client")
    if client is not None and not isinstance(client[0], str | None):
        return f"the client address is {_json_kind(client[0])}, not a string"
    return None


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _is_warmup(event: Mapping[str, Any]) -> bool:
    # {} or {"warmup": true}, naming a model (`"model": NAME`) where the function serves many.
    return not event or (event.get("warmup") is True and set(event) <= {"warmup", "model"})


class LambdaHandler:
    """`handler(event, context)`: HTTP events through Mangum to the app, `{"<field>": ...}`
    payloads and SQS records through `direct`, `{}` / `{"warmup": true}` through `warmup`."""

    def __init__(
        self,
        app: Any,
        *,
        warmup: Answer,
        direct: Answer | None = None,
        direct_keys: Collection[str] = ("inputs",),
        metrics: ModelMetrics | None = None,
        batched: Batched | None = None,
    ) -> None:
        from mangum import Mangum

        # lifespan="off": Mangum would run the ASGI lifespan (startup and shutdown) on every
        # invocation; the model lives in a holder for the whole execution environment instead.
        self.app = app
        self._mangum = Mangum(app, lifespan="off")
        self._warmup = warmup
        self._direct = direct
        self._direct_keys = frozenset(direct_keys)
        self._metrics = metrics
        self._batched = batched
        self._cold = True
        shapes = [HTTP_SHAPES]
        if direct is not None:
            example = ", ".join(f'"{key}": ...' for key in sorted(self._direct_keys))
            shapes += [f"{{{example}}} for a direct prediction", "an SQS batch of those"]
            if batched is not None and BATCH_KEY not in self._direct_keys:
                shapes.append(f'{{"{BATCH_KEY}": [{{...}}, ...]}} for many in one call')
        self.accepted = ", ".join([*shapes, WARMUP_SHAPE])

    def __call__(self, event: LambdaEvent, context: LambdaContext | None = None) -> Any:
        request_id = getattr(context, "aws_request_id", None)
        cold_start, self._cold = self._cold, False
        token = timing.begin()
        try:
            with bind(request_id=request_id, cold_start=cold_start):
                return self._dispatch(event, context)
        finally:
            if self._metrics is not None:
                self._metrics.publish(timing.current())
            timing.end(token)

    def _dispatch(self, event: Any, context: LambdaContext | None) -> Any:
        if not isinstance(event, Mapping):
            raise UnsupportedEvent(
                f"the event is a {type(event).__name__}; accepted: {self.accepted}"
            )
        http = self._http_handler(event, context)
        if http is not None:
            return self._serve_http(http)
        if self._direct is not None:
            if _is_sqs(event):
                if self._batched is not None:
                    return self._sqs_batched(event["Records"])
                return self._sqs(event["Records"])
            if self._batched is not None and _is_list(event, self._direct_keys):
                return {BATCH_KEY: self._many(event[BATCH_KEY])}
            if self._direct_keys & event.keys():
                return self._direct(event)
        if _is_warmup(event):
            return self._warmup(event)
        keys = ", ".join(sorted(str(k)[:40] for k in event)[:8])
        raise UnsupportedEvent(f"unsupported event with keys [{keys}]; accepted: {self.accepted}")

    def _http_handler(self, event: Mapping[str, Any], context: LambdaContext | None) -> Any:
        """Mangum's handler for an HTTP event (its own inference: ALB, API Gateway HTTP API and
        Function URL, REST, Lambda@Edge), or None for any other event. The handler's `scope`
        and `body` are read here, so a malformed HTTP event (a field null or of the wrong type)
        is an UnsupportedEvent before the app runs."""
        try:
            handler = self._mangum.infer(cast(Any, event), cast(Any, context))
        except Exception:  # RuntimeError: no handler infers it; others: a malformed event
            return None
        try:
            scope, body = handler.scope, handler.body
        except Exception as exc:
            raise UnsupportedEvent(
                f"malformed HTTP event ({type(exc).__name__}); accepted: {self.accepted}"
            ) from None
        problem = _scope_problem(scope)
        if problem is not None:
            raise UnsupportedEvent(f"malformed HTTP event ({problem}); accepted: {self.accepted}")
        return handler, scope, body

    def _serve_http(self, http: tuple[Any, Any, bytes]) -> Any:
        handler, scope, body = http
        # What Mangum's own __call__ does with lifespan="off": one HTTP cycle of the app.
        # One invocation at a time per execution environment: inference runs inline.
        with one_at_a_time():
            response = HTTPCycle(scope, body)(self.app)
        return handler(response)

    def _sqs(self, records: list[Mapping[str, Any]]) -> dict[str, Any]:
        """Lambda's partial batch response: only the records that were invalid or failed are
        listed, so SQS retries those alone (the event source mapping must set
        ReportBatchItemFailures). On a FIFO queue a failure also fails the later records of its
        message group, which keeps their order (as Powertools' SqsFifoPartialProcessor does)."""
        assert self._direct is not None
        failed: list[str] = []
        failed_groups: set[str | None] = set()
        # Models that cannot load now: their later records fail without waiting for (or
        # retrying) the same load; other models' records go on.
        unavailable: dict[Any, str] = {}
        for record in records:
            message_id = str(record.get("messageId", ""))
            attributes = record.get("attributes") or {}
            group = attributes.get("MessageGroupId") if isinstance(attributes, Mapping) else None
            fifo = str(record.get("eventSourceARN", "")).endswith(".fifo")
            with bind(message_id=message_id):
                if fifo and group in failed_groups:
                    failed.append(message_id)
                    continue
                model: Any = None
                try:
                    payload = _message_payload(record.get("body"))
                    model = payload.get("model")
                    if isinstance(model, Hashable) and model in unavailable:
                        raise ModelUnavailable(f"not tried: {unavailable[model]}")
                    answer = self._direct(payload)
                except (LambdaEventError, ModelNotFound, ModelUnavailable, PredictFailed) as exc:
                    # Worded by lazyserve; a PredictFailed's traceback is in the log already.
                    if isinstance(exc, ModelUnavailable) and isinstance(model, Hashable):
                        unavailable.setdefault(model, str(exc))
                    log.warning("SQS message %s failed: %s", message_id, exc)
                    failed.append(message_id)
                    failed_groups.add(group)
                except Exception:
                    # The predict function raised: this record fails alone, the others go on.
                    log.exception("SQS message %s failed: the predict function raised", message_id)
                    failed.append(message_id)
                    failed_groups.add(group)
                else:
                    log.info("SQS message %s answered", message_id, extra={"answer": answer})
        return {"batchItemFailures": [{"itemIdentifier": item} for item in failed]}

    # -- a batched predict function -------------------------------------------------------------

    def _many(self, payloads: Any) -> list[Any]:
        """A direct list: each payload's answer, or Lambda's error shape for one that failed
        (`{"errorType": "InvalidInput", "errorMessage": ...}`), in order."""
        if not isinstance(payloads, list):
            raise InvalidInput(
                f'"{BATCH_KEY}" is a {type(payloads).__name__}; accepted: a list of request '
                "objects, each as a direct invocation carries one"
            )
        assert self._batched is not None
        jobs = [_Job(f"{BATCH_KEY}[{i}]") for i in range(len(payloads))]
        for job, payload in zip(jobs, payloads, strict=True):
            try:
                if not isinstance(payload, Mapping):
                    raise InvalidInput(f"{job.label} is not a JSON object")
                job.key, job.request = self._batched.prepare(payload)
            except (LambdaEventError, ModelNotFound) as exc:
                job.error = exc
        self._answer_jobs([job for job in jobs if job.error is None], fifo=False)
        return [job.answer if job.error is None else _lambda_error(job.error) for job in jobs]

    def _sqs_batched(self, records: list[Mapping[str, Any]]) -> dict[str, Any]:
        """`_sqs` with one call per model for the valid records (at most max_size a call): the
        same partial batch response, the same FIFO rule, the same log lines."""
        assert self._batched is not None
        jobs: list[_Job] = []
        failed_groups: set[Hashable] = set()
        for record in records:
            job = _Job(str(record.get("messageId", "")))
            jobs.append(job)
            attributes = record.get("attributes") or {}
            group = attributes.get("MessageGroupId") if isinstance(attributes, Mapping) else None
            fifo = str(record.get("eventSourceARN", "")).endswith(".fifo")
            job.group = group if fifo and isinstance(group, Hashable) else None
            if fifo and job.group in failed_groups:
                job.error, job.quiet = InvalidInput(EARLIER_FAILED), True
                continue
            try:
                job.key, job.request = self._batched.prepare(_payload(record))
            except (ValueError, LambdaEventError, ModelNotFound) as exc:
                job.error = exc
                if fifo:
                    failed_groups.add(job.group)
        fifo = any(job.group is not None for job in jobs)
        self._answer_jobs([job for job in jobs if job.error is None], fifo=fifo)
        failed: list[str] = []
        for job in jobs:
            with bind(message_id=job.label):
                if job.error is None:
                    log.info("SQS message %s answered", job.label, extra={"answer": job.answer})
                    continue
                failed.append(job.label)
                if job.quiet:
                    continue
                reason = (
                    f"the message body is not JSON ({job.error})"
                    if isinstance(job.error, ValueError)
                    else str(job.error)
                )
                log.warning("SQS message %s failed: %s", job.label, reason)
        return {"batchItemFailures": [{"itemIdentifier": item} for item in failed]}

    def _answer_jobs(self, jobs: list[_Job], *, fifo: bool) -> None:
        """Answer valid `jobs` in as few calls as their models and max_size allow: the first
        job's model takes every later job of its model, except that on a FIFO queue a job
        whose group has an earlier job still unanswered waits for the next call, and a failed
        call fails the later jobs of its groups. A model that cannot load is tried once."""
        assert self._batched is not None
        unavailable: dict[Hashable, ModelUnavailable] = {}
        pending = jobs
        while pending:
            key = pending[0].key
            batch: list[_Job] = []
            rest: list[_Job] = []
            held: set[Hashable] = set()  # groups with an earlier job left for a later call
            for job in pending:
                if (
                    job.key == key
                    and len(batch) < self._batched.max_size
                    and not (fifo and job.group in held)
                ):
                    batch.append(job)
                else:
                    rest.append(job)
                    held.add(job.group)
            self._call(key, batch, unavailable)
            failed = {job.group for job in batch if fifo and job.error is not None}
            pending = []
            for job in rest:
                if job.group in failed:
                    job.error, job.quiet = InvalidInput(EARLIER_FAILED), True
                else:
                    pending.append(job)

    def _call(
        self, key: Hashable, batch: list[_Job], unavailable: dict[Hashable, ModelUnavailable]
    ) -> None:
        assert self._batched is not None
        if key in unavailable:
            error: Exception = ModelUnavailable(f"not tried: {unavailable[key]}")
            for job in batch:
                job.error = error
            return
        try:
            answers = self._batched.run(key, [job.request for job in batch])
        except (LambdaEventError, ModelNotFound, ModelUnavailable) as exc:
            if isinstance(exc, ModelUnavailable):
                unavailable[key] = exc
            for job in batch:
                job.error = exc
            return
        except Exception as exc:
            rid = request_id() or uuid.uuid4().hex
            labels = [job.label for job in batch]
            log.error(
                "the predict function raised %s for %d requests: %s",
                type(exc).__name__,
                len(batch),
                ", ".join(labels),
                exc_info=exc,
                extra={"request_id": rid},
            )
            failure = PredictFailed(rid)
            for job in batch:
                job.error, job.quiet = failure, True
            return
        for job, answer in zip(batch, answers, strict=True):
            job.answer = answer


def _is_list(event: Mapping[str, Any], direct_keys: Collection[str]) -> bool:
    # A request model with its own "batch" field keeps `{"batch": ...}` as one request.
    return BATCH_KEY not in direct_keys and set(event) == {BATCH_KEY}


def _payload(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """An SQS record's body as a JSON object; ValueError or InvalidInput otherwise."""
    body = record.get("body")
    if not isinstance(body, str):
        raise InvalidInput("the message body is not a JSON string")
    payload = json.loads(body)
    if not isinstance(payload, Mapping):
        raise InvalidInput("the message body is not a JSON object")
    return payload


def _lambda_error(exc: Exception) -> dict[str, str]:
    """Lambda's shape for a failed invocation, for one entry of a direct list."""
    return {"errorType": type(exc).__name__, "errorMessage": str(exc)}


def _message_payload(body: Any) -> Mapping[str, Any]:
    """An SQS message's body as the JSON object a direct invocation takes."""
    if not isinstance(body, str):
        raise InvalidInput(f"the message body is {_json_kind(body)}, not JSON text")
    try:
        payload = json.loads(body)
    except ValueError as exc:  # not JSON, or an integer over Python's digit limit
        raise InvalidInput(f"the message body is not JSON ({bounded(str(exc), 200)})") from exc
    except RecursionError as exc:
        raise InvalidInput("the message body is not JSON: it is nested too deeply") from exc
    if not isinstance(payload, Mapping):
        raise InvalidInput(f"the message body is {_json_kind(payload)}, not a JSON object")
    return payload


def invalid_input(exc: ValidationError, rules: str | None = None) -> InvalidInput:
    """An InvalidInput naming each bad place (`inputs[3]`), what is wrong and the rules."""
    errors = exc.errors()
    problems = []
    for error in errors[:5]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        problems.append(f"{where.lstrip('.') or 'payload'}: {error['msg']}")
    more = len(errors) - len(problems)
    tail = f" (and {more} more)" if more > 0 else ""
    accepted = f". Accepted: {rules}" if rules else ""
    return InvalidInput(f"{'; '.join(problems)}{tail}{accepted}")
