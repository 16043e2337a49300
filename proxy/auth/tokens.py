"""Bearer JWT verification against a JWKS (OpenID Connect discovery or a configured URL).

Keys are fetched with the proxy's own aiohttp session, cached, and fetched again when
a token names an unknown ``kid`` (at most once per ``min_refresh`` seconds, so garbage
tokens cannot make the proxy hammer the identity provider). Only asymmetric algorithms
on an allow-list are accepted: never ``none``, never an HMAC algorithm, so a public key
can never be used as an HMAC secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

import aiohttp
import jwt

ALLOWED_ALGORITHMS = ("RS256", "ES256")
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}


class TokenError(Exception):
    """Why a token is not accepted; the message is safe to return (no token content)."""


@dataclass(frozen=True)
class JwtSettings:
    audience: str
    issuer: str | None = None  # default: the discovered issuer
    oidc_issuer: str | None = None  # discovery at <issuer>/.well-known/openid-configuration
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ALLOWED_ALGORITHMS
    leeway: float = 60.0
    jwks_ttl: float = 300.0
    min_refresh: float = 30.0


class JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        if not settings.oidc_issuer and not settings.jwks_url:
            raise ValueError("JWT authentication needs --oidc-issuer or --jwks-url")
        if settings.jwks_url and not settings.oidc_issuer and not settings.issuer:
            raise ValueError("--jwks-url needs --token-issuer (the iss claim tokens must carry)")
        if not set(settings.algorithms) <= set(ALLOWED_ALGORITHMS):
            raise ValueError(f"algorithms must be among {', '.join(ALLOWED_ALGORITHMS)}")
        self.settings = settings
        self.issuer = settings.issuer or settings.oidc_issuer
        self._jwks_url = settings.jwks_url
        self._keys: dict[str, dict] = {}
        self._fetched = 0.0
        self._attempted = 0.0  # last fetch attempt, successful or not: failures back off too
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.openid_configuration: dict = {}  # the provider's discovery document (SMART discovery reuses it)

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Discover the JWKS and load it; the proxy refuses to start when this fails."""
        self._session = session
        if self.settings.oidc_issuer and not self._jwks_url:
            url = self.settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
            config = await self._get_json(url)
            self.openid_configuration = config
            self._jwks_url = config.get("jwks_uri")
            self.issuer = self.settings.issuer or config.get("issuer") or self.issuer
            if not isinstance(self._jwks_url, str):
                raise TokenError("the OpenID configuration names no jwks_uri")
        await self._refresh()

    async def _get_json(self, url: str) -> dict:
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise TokenError(f"the identity provider answered {resp.status}")
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            raise TokenError("the identity provider cannot be reached") from None
        if not isinstance(data, dict):
            raise TokenError("the identity provider answered with unexpected JSON")
        return data

    async def _refresh(self) -> None:
        self._attempted = time.monotonic()
        data = await self._get_json(self._jwks_url)  # type: ignore[arg-type]
        keys = {}
        for jwk in data.get("keys", []):
            if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and jwk.get("kty") in ("RSA", "EC"):
                keys[str(jwk.get("kid", ""))] = jwk
        self._keys, self._fetched = keys, time.monotonic()

    async def _key(self, kid: str, alg: str) -> jwt.PyJWK:
        now = time.monotonic()
        if kid not in self._keys or now - self._fetched > self.settings.jwks_ttl:
            async with self._lock:
                wanted = kid not in self._keys or now - self._fetched > self.settings.jwks_ttl
                if wanted and now - self._attempted > self.settings.min_refresh:
                    try:
                        await self._refresh()
                    except TokenError:
                        if kid not in self._keys:
                            raise
        jwk = self._keys.get(kid)
        if jwk is None:
            raise TokenError("the token is signed with an unknown key")
        if jwk.get("kty") != _KEY_TYPES[alg] or jwk.get("alg", alg) != alg:
            raise TokenError("the token's algorithm does not match its key")
        try:
            return jwt.PyJWK(jwk, algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenError("the provider's key for this token is malformed") from None

    async def verify(self, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("the token is malformed") from None
        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            raise TokenError("the token's signing algorithm is not allowed")
        key = await self._key(str(header.get("kid", "")), alg)
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"the token lacks the '{exc.claim}' claim") from None
        except jwt.PyJWTError:
            raise TokenError("the token's signature does not verify") from None
        return require_subject(claims)


def require_subject(claims: dict) -> dict:
    """The claims, if their ``sub`` names someone: audit records, canary blocking and per-caller
    decisions all key on it, so an empty, blank or non-string subject is no identity at all."""
    sub = claims.get("sub")
    if "sub" not in claims:
        raise TokenError("the token lacks the 'sub' claim")
    if type(sub) is not str or not sub.strip() or sub != sub.strip() or len(sub) > 255 or not sub.isprintable():
        raise TokenError("the token's 'sub' claim is not a usable subject identifier")
    return claims


class Introspector:
    """RFC 7662 token introspection for opaque (non-JWT) tokens, with a short positive cache.

    The proxy authenticates to the endpoint as a confidential client (HTTP Basic); the
    secret comes from a file or the environment, never a flag.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: str,
        audience: str,
        ttl: float = 60.0,
        max_entries: int = 10_000,
        leeway: float = 60.0,
    ) -> None:
        if not client_secret:
            raise ValueError("token introspection needs a client secret (FHIRCRYPT_INTROSPECTION_SECRET[_FILE])")
        self.url, self.audience, self.ttl, self.max_entries, self.leeway = url, audience, ttl, max_entries, leeway
        self._auth = {"Authorization": aiohttp.encode_basic_auth(client_id, client_secret)}
        self._cache: dict[str, tuple[float, dict]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Introspector({self.url})"

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def verify(self, token: str) -> dict:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        cached = self._cache.get(key)
        if cached and cached[0] > time.monotonic():
            claims = cached[1]
        else:
            claims = await self._ask(token)
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            exp = claims.get("exp")
            exp = exp if isinstance(exp, int | float) and not isinstance(exp, bool) else now
            expires = min(self.ttl, max(0.0, exp - now)) if claims["active"] else 10.0
            self._cache[key] = (time.monotonic() + expires, claims)  # inactive answers too: no endpoint flood
        if claims.get("active") is not True:
            raise TokenError("the token is not active")
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] + self.leeway < now:
            raise TokenError("the token has expired")
        audience = claims.get("aud")
        if self.audience not in (audience if isinstance(audience, list) else [audience]):
            raise TokenError("the token is not for this audience")
        return require_subject(claims)

    async def _ask(self, token: str) -> dict:
        assert self._session is not None
        try:
            async with self._session.post(
                self.url,
                data={"token": token, "token_type_hint": "access_token"},
                headers=self._auth,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                if resp.status != 200:
                    raise TokenError(f"the introspection endpoint answered {resp.status}")
                claims = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise TokenError("the introspection endpoint cannot be reached") from None
        if not isinstance(claims, dict) or claims.get("active") is not True:
            return {"active": False}
        return claims
