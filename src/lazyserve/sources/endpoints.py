"""Where an S3 request goes: the endpoint as botocore resolves it (its S3 endpoint rule set:
virtual-hosted or path style, partitions, FIPS and dual-stack, a custom endpoint), and the proxy,
chosen by urllib's rules.

botocore's resolution is used, not re-derived; what lazyserve computes is only the rule set's
inputs, the subset of botocore's client configuration a GET of one object needs (each documented
at `endpoint_inputs`, and checked against a real botocore client's URLs by the tests)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = ["Endpoint", "Proxy", "endpoint_inputs", "proxy_for", "region_of", "resolve_endpoint"]

_provider: Any = None
_provider_lock = threading.Lock()


@dataclass(frozen=True)
class Endpoint:
    """Where one bucket's requests go: scheme, Host header, connect address, and the path that
    comes before the key (`/bucket` in path style, a custom endpoint's own path)."""

    scheme: str
    netloc: str  # the Host header: host[:port]
    host: str
    port: int
    base_path: str  # the URL path before the key, without a trailing slash
    signing_region: str
    signing_name: str = "s3"

    def root(self) -> str:
        """The request path of the bucket itself (a listing's)."""
        return self.base_path or "/"

    def path(self, key: str) -> str:
        """The request path as sent and signed for S3: each byte outside RFC 3986's unreserved
        set as %XX, `/` kept, nothing normalised (S3 takes `a//b` literally)."""
        return f"{self.base_path}/{quote(key, safe='/~')}"


def region_of(environ: Mapping[str, str], session: Any = None) -> str:
    """AWS_REGION (what Lambda sets), else AWS_DEFAULT_REGION, else the profile's region (what
    botocore reads), else us-east-1."""
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if not region and session is not None:
        region = session.get_config_variable("region")
    return region or "us-east-1"


def endpoint_inputs(
    bucket: str, region: str, environ: Mapping[str, str], session: Any = None
) -> dict[str, Any]:
    """The S3 rule set's inputs, as botocore's client computes them (botocore/args.py,
    `compute_endpoint_resolver_builtin_defaults`) for the settings a load can have:
    AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else the profile's `endpoint_url` (none of them
    when AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true); FIPS and dual-stack from
    AWS_USE_FIPS_ENDPOINT / AWS_USE_DUALSTACK_ENDPOINT or the profile (ignored with a custom
    endpoint, as botocore ignores them); the profile's `s3` section (`addressing_style`,
    `use_accelerate_endpoint`, `use_dualstack_endpoint`). A custom endpoint is path style unless
    the profile says `addressing_style = virtual`, as in botocore; us-east-1 uses the global
    endpoint unless AWS_S3_US_EAST_1_REGIONAL_ENDPOINT (or the profile) says `regional`."""
    scoped: dict[str, Any] = {}
    if session is not None:
        scoped = session.get_scoped_config() or {}
    s3 = scoped.get("s3") or {}
    endpoint = _custom_endpoint(environ, scoped)
    fips = dualstack = False
    if endpoint is None:
        fips = _flag(environ, "AWS_USE_FIPS_ENDPOINT", scoped.get("use_fips_endpoint"))
        dualstack = _flag(
            environ,
            "AWS_USE_DUALSTACK_ENDPOINT",
            scoped.get("use_dualstack_endpoint") or s3.get("use_dualstack_endpoint"),
        )
    style = str(s3.get("addressing_style") or "auto").lower()
    accelerate = _truthy(s3.get("use_accelerate_endpoint"))
    # botocore's `_should_force_s3_global`: us-east-1 goes to the global endpoint unless the
    # profile or AWS_S3_US_EAST_1_REGIONAL_ENDPOINT asks for the regional one.
    regional = environ.get("AWS_S3_US_EAST_1_REGIONAL_ENDPOINT") or s3.get(
        "us_east_1_regional_endpoint", scoped.get("s3_us_east_1_regional_endpoint", "legacy")
    )
    inputs: dict[str, Any] = {
        "Bucket": bucket,
        "Region": region,
        "UseFIPS": fips,
        "UseDualStack": dualstack,
        "Accelerate": accelerate,
        "ForcePathStyle": (style != "virtual") if endpoint is not None else style == "path",
        "UseGlobalEndpoint": region == "us-east-1" and str(regional).lower() == "legacy",
    }
    if endpoint is not None:
        inputs["Endpoint"] = endpoint
    return inputs


def _custom_endpoint(environ: Mapping[str, str], scoped: Mapping[str, Any]) -> str | None:
    if _flag(environ, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", None):
        return None
    return (
        environ.get("AWS_ENDPOINT_URL_S3")
        or environ.get("AWS_ENDPOINT_URL")
        or scoped.get("endpoint_url")
        or None
    )


def _flag(environ: Mapping[str, str], name: str, configured: Any) -> bool:
    value = environ.get(name)
    return _truthy(value if value is not None else configured)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() == "true" if value is not None else False


def resolve_endpoint(inputs: Mapping[str, Any]) -> Endpoint:
    """The endpoint botocore's S3 rule set gives for `inputs` (see `endpoint_inputs`); raises
    ValueError with the rule set's own reason (e.g. a partition without FIPS endpoints)."""
    from botocore.exceptions import EndpointResolutionError

    try:
        resolved = _endpoint_provider().resolve_endpoint(**inputs)
    except EndpointResolutionError as exc:
        raise ValueError(f"S3 has no endpoint for these settings: {exc}") from None
    parts = urlsplit(resolved.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the S3 endpoint {resolved.url!r} is not an http(s) URL")
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    auth = (resolved.properties.get("authSchemes") or [{}])[0]
    return Endpoint(
        scheme=scheme,
        netloc=parts.netloc,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        signing_region=str(auth.get("signingRegion") or inputs["Region"]),
        signing_name=str(auth.get("signingName") or "s3"),
    )


def _endpoint_provider() -> Any:
    """botocore's S3 endpoint rule set and partitions, loaded once (35 ms of CPU here)."""
    global _provider
    with _provider_lock:
        if _provider is None:
            from botocore.endpoint_provider import EndpointProvider
            from botocore.loaders import create_loader

            loader = create_loader()
            _provider = EndpointProvider(
                loader.load_service_model("s3", "endpoint-rule-set-1"),
                loader.load_data("partitions"),
            )
        return _provider


@dataclass(frozen=True)
class Proxy:
    """An HTTP(S) proxy between lazyserve and an endpoint."""

    scheme: str  # "http" or "https" (TLS to the proxy itself)
    host: str
    port: int
    authorization: str | None  # Proxy-Authorization for user:password in the proxy URL

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def proxy_for(endpoint: Endpoint, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy `endpoint` is reached through, or None: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY and
    NO_PROXY, lower case first, by urllib's rules, which botocore applies too."""
    proxies = _proxies(environ)
    chosen = proxies.get(endpoint.scheme) or proxies.get("all")
    if not chosen or _bypassed(endpoint.host, endpoint.port, proxies.get("no", "")):
        return None
    parts = urlsplit(chosen if "://" in chosen else f"http://{chosen}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the proxy {parts.scheme}://{parts.hostname or ''} is not an http(s) URL")
    authorization = None
    if parts.username:
        import base64

        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    port = parts.port or (443 if scheme == "https" else 80)
    return Proxy(scheme, parts.hostname, port, authorization)


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """NO_PROXY as urllib.request reads it (its `proxy_bypass_environment`, which is not part of
    urllib's public API and reads os.environ only): `*`; a name that is the host or a domain it
    is in (a leading dot changes nothing); `host:port` entries match that port only."""
    if no_proxy.strip() == "*":
        return True
    host = host.lower()
    with_port = f"{host}:{port}"
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if not name:
            continue
        if name in (host, with_port) or host.endswith("." + name):
            return True
        if with_port.endswith("." + name):
            return True
    return False


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    # urllib.request.getproxies_environment() reads os.environ only; the same rule on a
    # mapping: NAME_proxy variables, the lower-case one winning.
    found: dict[str, str] = {}
    for name in sorted(environ, key=lambda n: n.islower()):
        lower = name.lower()
        if lower.endswith("_proxy") and environ[name]:
            found[lower[: -len("_proxy")]] = environ[name]
    return found
