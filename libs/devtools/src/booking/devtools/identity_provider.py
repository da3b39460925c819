"""An identity provider for tests: real RSA and EC key pairs, their JWKS served over real HTTP
(`booking.devtools.fixtures.serving`), tokens signed with them, and what a test needs to rotate
the keys, break the provider and count its requests. Nothing outside the tests imports it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from fastapi.responses import JSONResponse

ISSUER = "https://idp.example.test/realms/booking"
AUDIENCE = "booking-api"


@dataclass
class SigningKey:
    kid: str
    algorithm: str  # RS256 or ES256
    private: Any

    @classmethod
    def rsa(cls, kid: str | None = None) -> SigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"rsa-{uuid.uuid4().hex[:6]}", "RS256", private)

    @classmethod
    def ec(cls, kid: str | None = None) -> SigningKey:
        private = ec.generate_private_key(ec.SECP256R1())
        return cls(kid or f"ec-{uuid.uuid4().hex[:6]}", "ES256", private)

    def jwk(self) -> dict[str, Any]:
        """The public half as the provider publishes it."""
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        public = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid, **header}
        )


def claims(
    sub: str = "user-1", *, ttl: int = 600, role: Any = "admin", **extra: Any
) -> dict[str, Any]:
    """A provider's usual claims; `None` for a value leaves that claim out."""
    now = int(time.time())
    values = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + ttl,
        "role": role,
        **extra,
    }
    return {k: v for k, v in values.items() if v is not None}


def hs256_with_key(claims: dict[str, Any], secret: bytes, **header: Any) -> str:
    """HS256 signed by hand with any bytes (PyJWT refuses a PEM as an HMAC secret): the
    algorithm-confusion token, signed with a provider's public key."""

    def part(value: dict[str, Any]) -> bytes:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT", **header}) + b"." + part(claims)
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


@dataclass
class IdentityProvider:
    """Serves `/jwks.json` with the public halves of `keys`; `app` goes to `serving`."""

    keys: list[SigningKey] = field(default_factory=list)
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)  # published as they are
    requests: int = 0
    status: int = 200  # anything else: the provider is failing
    delay: float = 0.0  # seconds before each answer
    url: str = ""  # the JWKS URL, once served

    def __post_init__(self) -> None:
        self.app = FastAPI()
        self.app.add_api_route("/jwks.json", self._jwks, methods=["GET"])

    async def _jwks(self) -> JSONResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return JSONResponse({"error": "down for the test"}, self.status)
        return JSONResponse({"keys": [k.jwk() for k in self.keys] + self.extra_jwks})

    def served_at(self, base_url: str) -> IdentityProvider:
        self.url = f"{base_url}/jwks.json"
        return self

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The auth settings of a system that trusts this provider (outside development mode)."""
        return {
            "auth_jwks_url": self.url,
            "auth_issuer": ISSUER,
            "auth_audience": AUDIENCE,
            "development_mode": False,
            **overrides,
        }
