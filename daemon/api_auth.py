"""Bearer tokens by role for the HTTP API: ``producer`` (edits in) and ``admin`` (rollback, retract).

A route names the roles it accepts. Answers: 401 without ``Authorization: Bearer <token>`` or
with a token that is no role's; 403 with a valid token of a role the route does not accept, or
when none of its roles has a token configured (the route is then disabled). Tokens are compared
in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request

SETTING = {"producer": "serve.producer_token (MELO_SERVE__PRODUCER_TOKEN)",
           "admin": "serve.admin_token (MELO_SERVE__ADMIN_TOKEN)"}


@dataclass(frozen=True)
class RoleTokens:
    """The configured token of each role (``None``: that role is disabled)."""

    producer: str | None = None
    admin: str | None = None

    def role_of(self, given: str) -> str | None:
        """The role whose token ``given`` is, or None."""
        found = None
        for role in ("producer", "admin"):
            token = getattr(self, role)
            # No early exit: every configured token is compared, so timing says nothing about which matched.
            if token is not None and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
                found = role
        return found

    def require(self, *roles: str) -> Callable[[Request], str]:
        """A FastAPI dependency admitting a bearer token of one of ``roles``; returns the role."""
        def dependency(request: Request) -> str:
            configured = [role for role in roles if getattr(self, role) is not None]
            if not configured:
                settings = " or ".join(SETTING[role] for role in roles)
                raise HTTPException(403, f"this route is disabled: set {settings}")
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise HTTPException(401, f"send 'Authorization: Bearer <token>' with a {' or '.join(roles)} token",
                                    headers={"WWW-Authenticate": "Bearer"})
            role = self.role_of(given.strip())
            if role is None:
                raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
            if role not in roles:
                raise HTTPException(403, f"this is the {role} token; this route needs a {' or '.join(roles)} token")
            return role

        return dependency
