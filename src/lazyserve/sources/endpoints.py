"""Where an S3 request goes: the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else S3's
regional endpoint, FIPS and dual-stack as asked), its addressing style, and the proxy, if any."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

__all__ = ["Endpoint", "Route", "region_of", "resolve_endpoint", "route"]


@dataclass(frozen=True)
class Endpoint:
    """Where one bucket's requests go: scheme, Host header, connect address, addressing style."""

    scheme: str
    netloc: str  # the Host header: host[:port]
    host: str
    port: int
    prefix: str  # a path the endpoint URL carries before the bucket
    path_style: bool

    def path(self, bucket: str, key: str) -> str:
        """The request path, encoded as SigV4 signs it for S3: each byte outside RFC 3986's
        unreserved set as %XX, `/` kept, nothing normalised (S3 takes `a//b` literally)."""
        encoded = quote(key, safe="/")
        if self.path_style:
            return f"{self.prefix}/{quote(bucket, safe='')}/{encoded}"
        return f"{self.prefix}/{encoded}"


def region_of(environ: Mapping[str, str]) -> str:
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def resolve_endpoint(bucket: str, region: str, environ: Mapping[str, str]) -> Endpoint:
    """AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (path-style, as given), else S3's regional
    endpoint: virtual-hosted, or path-style for bucket names with dots (their TLS names would
    not match `*.s3.REGION.amazonaws.com`)."""
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the S3 endpoint URL {url!r} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Endpoint(
            parts.scheme, parts.netloc, parts.hostname, port, parts.path.rstrip("/"), True
        )
    fips = environ.get("AWS_USE_FIPS_ENDPOINT", "").lower() == "true"
    dualstack = environ.get("AWS_USE_DUALSTACK_ENDPOINT", "").lower() == "true"
    service = ("s3-fips" if fips else "s3") + (".dualstack" if dualstack else "")
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    host = f"{service}.{region}.{suffix}"
    if "." in bucket:
        return Endpoint("https", host, host, 443, "", True)
    host = f"{bucket}.{host}"
    return Endpoint("https", host, host, 443, "", False)


@dataclass(frozen=True)
class Route:
    """How to reach an endpoint: directly, or through an HTTP proxy (a CONNECT tunnel for
    https; an absolute-form request target for plain http, as botocore does)."""

    host: str
    port: int
    tunnel: bool = False
    target_prefix: str = ""  # "http://host:port" in front of the path, through a proxy
    proxy_headers: dict[str, str] = field(default_factory=dict)


def route(endpoint: Endpoint, environ: Mapping[str, str]) -> Route:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read as botocore reads them (urllib's rules)."""
    proxies = _proxies(environ)
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if not proxy or _bypassed(endpoint.host, proxies.get("no", "")):
        return Route(endpoint.host, endpoint.port)
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if parts.username:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    host, port = parts.hostname or "", parts.port or 80
    if endpoint.scheme == "https":
        return Route(host, port, tunnel=True, proxy_headers=headers)
    return Route(host, port, target_prefix=f"http://{endpoint.netloc}", proxy_headers=headers)


def _bypassed(host: str, no_proxy: str) -> bool:
    """NO_PROXY as urllib reads it: `*`, or names that match the host or a domain it is in."""
    host = host.lower()
    for name in no_proxy.replace(" ", "").lower().split(","):
        name = name.lstrip(".")
        if name == "*" or (name and (host == name or host.endswith("." + name))):
            return True
    return False


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    # urllib.request.getproxies_environment() reads os.environ only; lower case wins.
    found: dict[str, str] = {}
    for name in sorted(environ, key=lambda n: n.islower()):
        lower = name.lower()
        if lower.endswith("_proxy") and environ[name]:
            found[lower[: -len("_proxy")]] = environ[name]
    return found
