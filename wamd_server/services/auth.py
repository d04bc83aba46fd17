"""Login, logout and token resolution, with login attempts limited per account and per address."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from wamd_server.domain.errors import RateLimited, Unauthorized
from wamd_server.domain.models import User
from wamd_server.domain.ports import Clock, RateLimiter, TokenRepository, UserRepository
from wamd_server.services.passwords import verify_password
from wamd_server.services.tokens import new_token, token_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoginLimits:
    account_failures: int = 5  # failed logins per account per window
    address_attempts: int = 30  # failed logins per client address per window
    window_s: int = 15 * 60


class AuthService:
    def __init__(
        self,
        users: UserRepository,
        tokens: TokenRepository,
        limiter: RateLimiter,
        clock: Clock,
        *,
        token_ttl: timedelta,
        limits: LoginLimits | None = None,
    ) -> None:
        self._users = users
        self._tokens = tokens
        self._limiter = limiter
        self._clock = clock
        self._ttl = token_ttl
        self._limits = limits or LoginLimits()

    async def login(self, email: str, password: str, address: str) -> tuple[str, User]:
        email = email.strip().lower()
        lim = self._limits
        account_key, address_key = f"login:account:{email}", f"login:address:{address}"
        wait = max(
            await self._limiter.blocked_for(account_key, lim.account_failures, lim.window_s),
            await self._limiter.blocked_for(address_key, lim.address_attempts, lim.window_s),
        )
        if wait:
            raise RateLimited(f"too many failed logins; try again in {wait} s", wait)

        creds = await self._users.by_email(email)
        valid = await verify_password(creds.password_hash if creds else None, password)
        if not creds or not valid or not creds.user.is_active:
            await self._limiter.hit(account_key, lim.account_failures, lim.window_s)
            await self._limiter.hit(address_key, lim.address_attempts, lim.window_s)
            log.info("failed login for %s from %s", email, address)
            raise Unauthorized("invalid email or password")

        await self._limiter.reset(account_key)
        token = new_token()
        now = self._clock.now()
        await self._tokens.add(creds.user.id, token_digest(token), now + self._ttl)
        await self._users.touch_login(creds.user.id, now)
        creds.user.last_login_at = now
        return token, creds.user

    async def user_for_token(self, token: str) -> User:
        user = await self._tokens.user_for(token_digest(token), self._clock.now())
        if user is None:
            raise Unauthorized("invalid or expired token")
        return user

    async def logout(self, token: str) -> None:
        await self._tokens.delete(token_digest(token))
