"""paseto-tool: make keys, mint tokens and check them, as the gateway sees them.

The flags follow the original Go tool (Go's flag syntax: ``-action=public``,
``--action public``, ``-force``), and settings are read exactly as the
server reads them (``--settings DIR``, ``--env NAME`` or GO_ENV /
RUNNER_GATEWAY_ENV). Tokens and keys meant for the user go to stdout,
everything else to stderr. No Twisted here: the tool stays quick to start.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from runner_gateway.lifecycle import (
    UsageProblem,
    append_ledger,
    list_issued,
    list_revocations,
    revoke,
)
from runner_gateway.paseto import (
    LocalKey,
    PasetoError,
    PasetoKeyError,
    SecretKey,
    V2LocalKey,
    V2SecretKey,
    V4LocalKey,
    V4SecretKey,
    build_verifier,
    footer_kid,
    issue,
    load_local_key,
    load_secret_key,
    public_key_pem,
    rfc3339,
    secret_key_pem,
)
from runner_gateway.revocation import RevocationError, precise_rfc3339
from runner_gateway.settings import (
    SCOPES,
    PasetoSettings,
    Settings,
    SettingsError,
    load_settings,
    parse_duration,
)

__all__ = ["ToolError", "UsageError", "main", "parse_flags"]

PROG = "paseto-tool"
ACTIONS = (
    "asymmetric",
    "symmetric",
    "public",
    "private",
    "validate",
    "revoke",
    "revocations",
    "issued",
)


class ToolError(Exception):
    """A failure reported as one line on stderr, exit status 1."""


class UsageError(ToolError):
    """Bad flags: exit status 2, as Go's flag package does."""


class _Help(Exception):
    pass


@dataclass(frozen=True)
class _Flag:
    name: str
    help: str
    is_bool: bool = False
    # A bool flag that also takes -name=VALUE (for -kid: a switch when minting, an id to revoke).
    may_have_value: bool = False


_FLAGS = {
    flag.name: flag
    for flag in (
        _Flag(
            "action",
            "asymmetric | symmetric | public | private | validate | revoke | revocations | issued",
        ),
        _Flag("settings", "settings directory (default ./settings)"),
        _Flag("env", "settings overlay <settings>/<env>.yaml (else RUNNER_GATEWAY_ENV, GO_ENV)"),
        _Flag(
            "force",
            "asymmetric: replace existing key files; public/private: allow unknown -runners",
            is_bool=True,
        ),
        _Flag("token", "validate: the token, or - to read it from stdin"),
        _Flag("sub", "public/private: subject claim; revoke/issued: the subject"),
        _Flag("aud", "public/private: audience claim (default paseto.audience)"),
        _Flag("iss", "public/private: issuer claim (default paseto.issuer)"),
        _Flag("jti", "public/private: token id (default: random); revoke: the token id"),
        _Flag("scope", 'public/private: space-separated scopes, e.g. "inference models:read"'),
        _Flag("models", 'public/private: comma-separated model patterns, e.g. "llama3:*,tiny*"'),
        _Flag("runners", 'public/private: comma-separated runner names, e.g. "ollama,corp"'),
        _Flag(
            "exp",
            "public/private: lifetime instead of paseto.expiration (Go form: 1h, 30m); "
            "revoke: the longest lifetime of the tokens it revokes (lets the entry expire)",
        ),
        _Flag("tier", "public/private: tier claim (a limits tier)"),
        _Flag(
            "kid",
            "public/private: put the key's PASERK id in the footer; "
            "revoke: -kid=k4.pid... revokes every token of that key",
            is_bool=True,
            may_have_value=True,
        ),
        _Flag("reason", "revoke: why (kept with the entry, never shown to clients)"),
    )
}

_STDIN = "-"
_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def usage() -> str:
    lines = [f"usage: {PROG} -action=ACTION [flags]", "", "flags (one or two dashes):"]
    for flag in _FLAGS.values():
        form = f"-{flag.name}" if flag.is_bool else f"-{flag.name}=VALUE"
        lines.append(f"  {form:<18} {flag.help}")
    return "\n".join(lines)


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Go flag syntax: -name=value, -name value, --name[=value]; bools take no value."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, value = body.partition("=")
        if not name or name.startswith("-"):
            raise UsageError(f"bad flag syntax: {arg}")
        if name in ("h", "help"):
            raise _Help
        flag = _FLAGS.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if flag.is_bool:
            if not has_value or value in _TRUE:
                values[name] = True
            elif value in _FALSE:
                values[name] = False
            elif flag.may_have_value and value:
                values[name] = value
            else:
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
        else:
            if not has_value:
                i += 1
                if i == len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            values[name] = value
        i += 1
    if i < len(argv):
        raise UsageError(f"unexpected argument: {argv[i]}")
    return values


# ------------------------------------------------------------------ helpers


def _lifetime(text: str) -> float:
    """A Go duration, which (as in Go) may be negative: handy for an expired test token."""
    negative = text.startswith("-")
    try:
        seconds = parse_duration(text[1:] if negative else text)
    except ValueError as exc:
        raise UsageError(f"-exp: {exc}") from None
    return -seconds if negative else seconds


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _write_new(path: str, data: bytes, mode: int, force: bool) -> None:
    """Create path with mode from the start (O_EXCL: no umask race, no symlink follow)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    target = f"{path}.tmp-{secrets.token_hex(4)}" if force else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(target)
        raise
    if force:
        os.replace(target, path)


# ------------------------------------------------------------------ actions


class _Tool:
    def __init__(
        self, flags: dict[str, Any], stdin: TextIO, stdout: TextIO, stderr: TextIO
    ) -> None:
        self.flags = flags
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._settings: Settings | None = None

    def say(self, text: str) -> None:
        print(text, file=self.stderr)

    @property
    def all_settings(self) -> Settings:
        if self._settings is None:
            directory = self.flags.get("settings") or "settings"
            self._settings = load_settings(directory, env=self.flags.get("env") or None)
        return self._settings

    @property
    def settings(self) -> PasetoSettings:
        return self.all_settings.paseto

    def asymmetric(self) -> None:
        settings = self.settings
        force = bool(self.flags.get("force"))
        paths = (settings.key_path, settings.public_path)
        if not force:
            for path in paths:
                if os.path.lexists(path):
                    raise ToolError(f"{path} already exists (use -force to replace the key pair)")
        key = (V4SecretKey if settings.version == "v4" else V2SecretKey).generate()
        public = key.public_key()
        _write_new(settings.key_path, secret_key_pem(key), 0o600, force)
        try:
            _write_new(settings.public_path, public_key_pem(public), 0o644, force)
        except BaseException:
            if not force:  # do not leave half a pair behind
                os.unlink(settings.key_path)
            raise
        self.say(f"wrote the private key to {settings.key_path} (PKCS#8 PEM, mode 0600)")
        self.say(f"wrote the public key to {settings.public_path} (SubjectPublicKeyInfo PEM)")
        self.say(f"public key: {public.paserk()}")
        self.say(f"key id:     {public.paserk_id()}")

    def symmetric(self) -> None:
        key = (V4LocalKey if self.settings.version == "v4" else V2LocalKey).generate()
        print(f"hex:    {key.raw.hex()}", file=self.stdout)
        print(f"paserk: {key.paserk()}", file=self.stdout)
        print(f"lid:    {key.paserk_id()}", file=self.stdout)
        self.say("put the hex or the PASERK into paseto.secretKey (or PASETO_SECRET_KEY)")

    def _secret_key(self) -> SecretKey:
        path = self.settings.key_path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ToolError(
                f"paseto.keyPath {path}: not found (make a pair with -action=asymmetric)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolError(f"paseto.keyPath {path}: cannot read ({type(exc).__name__})") from None
        try:
            return load_secret_key(text, self.settings.version)
        except PasetoKeyError as exc:
            raise ToolError(f"paseto.keyPath {path}: {exc}") from None

    def _local_key(self) -> LocalKey:
        text = self.settings.secret_key
        if not text:
            raise ToolError("paseto.secretKey is not set (make one with -action=symmetric)")
        try:
            return load_local_key(text, self.settings.version)
        except PasetoKeyError as exc:
            raise ToolError(f"paseto.secretKey: {exc}") from None

    def mint(self, purpose: str) -> None:
        settings = self.settings
        flags = self.flags
        lifetime = _lifetime(flags["exp"]) if "exp" in flags else settings.expiration
        scope = " ".join(str(flags.get("scope", "")).split())
        for item in scope.split():
            if item not in SCOPES:
                raise UsageError(f"-scope: unknown scope {item!r} (one of {', '.join(SCOPES)})")
        if isinstance(flags.get("kid"), str):
            raise UsageError("-kid takes no value when minting (it is a switch)")
        known = {runner.name for runner in self.all_settings.runners}
        unknown = [name for name in _list(flags.get("runners", "")) if name not in known]
        if unknown and not flags.get("force"):
            raise ToolError(
                f"-runners: the settings have no runner named {unknown[0]!r} "
                f"(they have {', '.join(sorted(known))}; -force mints it anyway)"
            )
        key: SecretKey | LocalKey
        key = self._secret_key() if purpose == "public" else self._local_key()
        now = time.time()
        claims: dict[str, Any] = {}
        for claim, default in (("iss", settings.issuer), ("sub", ""), ("aud", settings.audience)):
            value = flags.get(claim) or default
            if value:
                claims[claim] = value
        if lifetime:
            claims["exp"] = rfc3339(now + lifetime)
        claims["nbf"] = rfc3339(now)
        # Microseconds: a subject revoked this second keeps tokens minted after it (revocation.py).
        claims["iat"] = precise_rfc3339(now)
        claims["jti"] = flags.get("jti") or secrets.token_hex(16)
        if scope:
            claims["scope"] = scope
        for claim in ("models", "runners"):
            if claim in flags:
                claims[claim] = _list(flags[claim])
        if flags.get("tier"):
            claims["tier"] = flags["tier"]
        footer = None
        if flags.get("kid"):
            footer = {"kid": footer_kid(key)}
        implicit = settings.implicit_assertion.encode() if settings.version == "v4" else b""
        token = issue(key, claims, footer, implicit=implicit)
        if settings.ledger_path:
            # Before the token is shown: no token leaves the tool unrecorded.
            append_ledger(settings.ledger_path, {**claims, "kid": footer_kid(key)})
        print(token, file=self.stdout)
        if "sub" not in claims:
            self.say(
                "warning: the token has no sub: its requests cannot be told apart in logs and "
                "metrics, and -action=revoke -sub cannot reach it (use -sub=NAME)"
            )
        if not lifetime:
            self.say(
                "warning: the token has no exp; the gateway refuses it unless "
                "paseto.requireExpiration is false"
            )
        elif lifetime < 0:
            self.say("warning: the token is already expired")
        self.say(
            f"minted a {settings.version}.{purpose} token"
            + (f" for {claims['sub']}" if "sub" in claims else "")
            + (f", expires {claims['exp']}" if "exp" in claims else "")
        )

    def validate(self) -> None:
        token = self.flags.get("token")
        if not token:
            raise UsageError("validate needs -token=TOKEN (or -token=- to read stdin)")
        if token == _STDIN:
            token = self.stdin.read()
        verifier = build_verifier(self.settings)
        try:
            verified = verifier.verify(token.strip())
        except PasetoError as exc:
            raise ToolError(f"invalid token: {exc.reason}: {exc.description}") from None
        print(json.dumps(dict(verified.claims), indent=2), file=self.stdout)
        self.say("valid token" + (f" (kid {verified.kid})" if verified.kid else ""))


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    args = sys.argv[1:] if argv is None else argv
    err = stderr or sys.stderr
    try:
        flags = parse_flags(args)
        action = flags.get("action")
        if action not in ACTIONS:
            raise UsageError("missing -action" if action is None else f"unknown action {action!r}")
        tool = _Tool(flags, stdin or sys.stdin, stdout or sys.stdout, err)
        actions: dict[str, Callable[[], None]] = {
            "asymmetric": tool.asymmetric,
            "symmetric": tool.symmetric,
            "public": lambda: tool.mint("public"),
            "private": lambda: tool.mint("local"),
            "validate": tool.validate,
            "revoke": lambda: revoke(flags, tool.all_settings, tool.stdout, err),
            "revocations": lambda: list_revocations(tool.all_settings, tool.stdout, err),
            "issued": lambda: list_issued(flags, tool.all_settings, tool.stdout, err),
        }
        actions[action]()
    except _Help:
        print(usage(), file=stdout or sys.stdout)
        return 0
    except (UsageError, UsageProblem) as exc:
        print(f"{PROG}: {exc} (see {PROG} -help)", file=err)
        return 2
    except (ToolError, SettingsError, PasetoKeyError, RevocationError) as exc:
        print(f"{PROG}: {exc}", file=err)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{PROG}:{where}: {exc.strerror or type(exc).__name__}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Messages of unexpected errors could quote key material: the type only.
        print(f"{PROG}: unexpected error ({type(exc).__name__})", file=err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
