"""JWT bearer auth (HS256 with AUTH_JWT_SECRET): who is calling, and in which role.

`python -m booking.runtime.auth ROLE [SUB]` prints a signed dev token (`make token`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from booking.runtime.settings import RuntimeSettings


class Role(StrEnum):
    ADMIN = "admin"
    MENTOR = "mentor"
    MENTEE = "mentee"


@dataclass(frozen=True)
class Identity:
    sub: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def acts_as_mentor(identity: Identity, mentor_id: UUID, identity_subject: str | None) -> bool:
    """Whether `identity` may act as the mentor `mentor_id`: an admin always; a mentor whose
    token's `sub` is the id the system gave (development tokens) or the identity-provider subject
    stored on the mentor's record (a provider's `sub` is its own, not ours)."""
    if identity.is_admin:
        return True
    if identity.role is not Role.MENTOR:
        return False
    return identity.sub == str(mentor_id) or (
        identity_subject is not None and identity.sub == identity_subject
    )


class InvalidToken(Exception):
    pass


def issue_token(secret: str, sub: str, role: Role | str, *, ttl_seconds: int = 3600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "role": str(Role(role)), "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str) -> Identity:
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub", "role"]}
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"the token is not valid: {exc}") from None
    try:
        role = Role(claims["role"])
    except ValueError:
        raise InvalidToken("the token's role is not one of admin, mentor, mentee") from None
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise InvalidToken("the token has no subject")
    return Identity(sub=claims["sub"], role=role)


_bearer = HTTPBearer(auto_error=False)


async def authenticated(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Identity:
    """Dependency: the caller's identity, or 401."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    secret: str = request.app.state.settings.auth_jwt_secret.get_secret_value()
    try:
        return verify_token(secret, credentials.credentials)
    except InvalidToken as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def require_roles(*roles: Role):
    """Dependency factory: the caller's identity if it has one of `roles`, else 403."""

    async def dependency(identity: Identity = Depends(authenticated)) -> Identity:
        if identity.role not in roles:
            allowed = ", ".join(str(r) for r in roles)
            raise HTTPException(
                403, f"this needs the role {allowed}; the token has {identity.role}"
            )
        return identity

    return dependency


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else "admin"
    sub = sys.argv[2] if len(sys.argv) > 2 else f"dev-{role}"
    print(issue_token(RuntimeSettings().auth_jwt_secret.get_secret_value(), sub, role))
