"""AWS Signature Version 4 for S3 GETs and HEADs, with hmac and hashlib ("Authenticating
Requests: Using the Authorization Header (AWS Signature Version 4)" in the S3 API reference)."""

from __future__ import annotations

import hashlib
import hmac
import time

from lazyserve.sources.credentials import Credentials

__all__ = ["EMPTY_SHA256", "Signer"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a GET's payload hash: it has no body


class Signer:
    """Signs requests for one service in any region; caches the day's signing key."""

    def __init__(self, service: str = "s3") -> None:
        self.service = service
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def sign(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        credentials: Credentials,
        region: str,
    ) -> dict[str, str]:
        """`headers` (Host included) plus X-Amz-Date, X-Amz-Content-SHA256, the session token
        and Authorization; every header given is signed. `path` and `query` must be encoded
        exactly as they are sent: S3's canonical URI is the path as sent, not normalised."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = stamp[:8]
        signed_headers = {**headers, "X-Amz-Content-SHA256": EMPTY_SHA256, "X-Amz-Date": stamp}
        if credentials.token:
            signed_headers["X-Amz-Security-Token"] = credentials.token
        names = sorted((name.lower(), value.strip()) for name, value in signed_headers.items())
        signed = ";".join(name for name, _ in names)
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{name}:{value}\n" for name, value in names),
                signed,
                EMPTY_SHA256,
            ]
        )
        scope = f"{day}/{region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = self._key(credentials.secret_key, day, region)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed_headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return signed_headers

    def _key(self, secret: str, day: str, region: str) -> bytes:
        cached = self._keys.get((secret, day, region))
        if cached is not None:
            return cached
        key = ("AWS4" + secret).encode()
        for part in (day, region, self.service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._keys = {(secret, day, region): key}  # one day's key, for the current secret
        return key
