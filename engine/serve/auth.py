"""Bearer API keys: read from key files, compared in constant time, naming the caller.

A key file holds one key per line (blank lines and `#` comments ignored). A caller is known by
a short digest of its key, never the key itself, so job ownership and logs hold no secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

ANONYMOUS = "anonymous"  # the one caller of a server without API keys


class ConfigError(Exception):
    """A refused server configuration (the CLI reports it in one line, exit status 2)."""


class AuthError(Exception):
    """401 (no or a wrong key) or 403 (a valid key without the admin right)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_key_file(path) -> list[str]:
    """The keys in `path`; ConfigError when it holds none (a server must not start keyless by
    mistake) or a key shorter than 16 characters (guessable)."""
    with open(path, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"{path}: no keys (one per line)")
    short = [i for i, k in enumerate(keys) if len(k) < 16]
    if short:
        raise ConfigError(f"{path}: key on line {short[0] + 1} is shorter than 16 characters")
    return keys


def caller_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Keys:
    """The server's API keys and admin keys (admin keys are API keys too).

    Semantics:
      caller(authorization header) -> caller id; AuthError(401) when keys are configured and the
                                      header is missing or holds no known key
      admin(authorization header)  -> caller id of an admin key; AuthError(401/403) otherwise,
                                      and 403 when the server has no admin key at all
    Every configured key is compared, with hmac.compare_digest, whatever matched first, so the
    time taken does not tell how much of a key was right or which key matched.
    """

    def __init__(self, api_keys=(), admin_keys=()):
        self.admin_keys = [k.encode() for k in admin_keys]
        self.api_keys = [k.encode() for k in api_keys] + self.admin_keys
        self.required = bool(api_keys)

    def caller(self, header: str | None) -> str:
        if not self.required:
            return self._match(header, self.api_keys) or ANONYMOUS
        key = self._match(header, self.api_keys)
        if key is None:
            raise AuthError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')")
        return key

    def admin(self, header: str | None) -> str:
        if not self.admin_keys:
            raise AuthError(403, "adapter management is disabled: the server has no admin key (--admin-key-file)")
        key = self._match(header, self.admin_keys)
        if key is None:
            if self._match(header, self.api_keys) is not None:
                raise AuthError(403, "this key may not manage adapters (an admin key is needed)")
            raise AuthError(401, "missing or invalid admin key (send 'Authorization: Bearer KEY')")
        return key

    @staticmethod
    def _match(header: str | None, keys: list[bytes]) -> str | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found = None
        for key in keys:  # no early exit: every key costs the same comparison
            if hmac.compare_digest(given, key):
                found = key
        return None if found is None else caller_id(found.decode())


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost": the addresses only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key_file) -> None:
    """Without API keys the server must stay on this machine: only loopback hosts are allowed."""
    if api_key_file is None and not is_loopback(host):
        raise ConfigError(f"--host {host}: refusing to serve beyond loopback without --api-key-file "
                          f"(anyone who can reach the port could use the server)")
