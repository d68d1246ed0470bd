"""What a predict function takes and returns, read from its signature: the request model
(validated the same way for HTTP, direct and SQS invocations), the response type, and the rules
an InvalidInput names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, get_args, get_origin

import torch
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, TypeAdapter

__all__ = ["batch_io_types", "dumper", "in_inference_mode", "io_types", "rules"]

R = TypeVar("R")


def io_types(fn: Callable[..., Any]) -> tuple[type[BaseModel], Any]:
    """The request model (the second parameter's annotation) and the response type."""
    params = list(inspect.signature(fn).parameters)
    if inspect.iscoroutinefunction(fn) or len(params) != 2:
        raise TypeError(
            f"{fn.__name__}() must be a plain `def {fn.__name__}(model, request)`: it runs in a "
            "worker thread or inline, under torch.inference_mode()"
        )
    request_type = _annotation(fn, params[1])
    if not (isinstance(request_type, type) and issubclass(request_type, BaseModel)):
        raise TypeError(
            f"annotate {fn.__name__}()'s second parameter with a pydantic model (the request "
            f"body), got {request_type!r}"
        )
    return request_type, _annotation(fn, "return")


def batch_io_types(fn: Callable[..., Any]) -> tuple[type[BaseModel], Any]:
    """For `def fn(model, requests: list[Req]) -> list[Resp]`: the request model Req and the
    response type Resp (None without a return annotation)."""
    name = fn.__name__
    params = list(inspect.signature(fn).parameters)
    if inspect.iscoroutinefunction(fn) or len(params) != 2:
        raise TypeError(
            f"{name}() must be a plain `def {name}(model, requests)`: it runs in a worker "
            "thread under torch.inference_mode(), once for many requests"
        )
    annotation = _annotation(fn, params[1])
    request_type = _item_type(annotation)
    if not (isinstance(request_type, type) and issubclass(request_type, BaseModel)):
        raise TypeError(
            f"annotate {name}()'s second parameter as list[YourRequest], YourRequest a pydantic "
            f"model (one request body), got {annotation!r}"
        )
    returned = _annotation(fn, "return")
    if returned is None:
        return request_type, None
    response_type = _item_type(returned)
    if response_type is None:
        raise TypeError(
            f"annotate {name}()'s return as list[YourResponse] (one response per request, in "
            f"order), got {returned!r}"
        )
    return request_type, response_type


def _item_type(annotation: Any) -> Any:
    """X of `list[X]` or `Sequence[X]`, else None."""
    args = get_args(annotation)
    if get_origin(annotation) in (list, Sequence) and len(args) == 1:
        return args[0]
    return None


def _annotation(fn: Callable[..., Any], name: str) -> Any:
    # Only the annotations lazyserve needs are resolved (with `from __future__ import
    # annotations` they are strings): the model parameter's may name a class imported anywhere.
    annotation = fn.__annotations__.get(name)
    if not isinstance(annotation, str):
        return annotation
    names = {**fn.__globals__, **inspect.getclosurevars(fn).nonlocals}
    try:
        return eval(annotation, names)  # the same evaluation typing.get_type_hints does
    except NameError as exc:
        raise TypeError(
            f"cannot resolve the annotation {annotation!r} of {fn.__name__}() ({exc}): define "
            "the request and response models before the function"
        ) from None


def in_inference_mode(fn: Callable[..., R]) -> Callable[..., R]:
    def call(*args: Any) -> R:
        with torch.inference_mode():
            return fn(*args)

    return call


def rules(request_type: type[BaseModel]) -> str | None:
    """What a valid request looks like, from the fields' descriptions, for InvalidInput."""
    rules = [
        f"{field.alias or name}: {field.description}"
        for name, field in request_type.model_fields.items()
        if field.description
    ]
    return "; ".join(rules) or None


def dumper(response_type: Any) -> Callable[[Any], Any]:
    """The JSON-ready form of a response, as the HTTP route would send it: validated against
    the declared response type first (pydantic's ValidationError when it does not match)."""
    if response_type is None:
        return jsonable_encoder
    adapter: TypeAdapter[Any] = TypeAdapter(response_type)

    def dump(value: Any) -> Any:
        # FastAPI validates a route's answer before serialising it; dump_python alone would
        # send a mismatched answer on (with a warning).
        valid = adapter.validate_python(value, from_attributes=True)
        return adapter.dump_python(valid, mode="json")

    return dump
