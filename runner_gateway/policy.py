"""Who may do what: scopes, the endpoint table, model allow-lists, listing filters.

Pure logic, no Twisted (``authz.py`` is the glue). The gateway keeps no
database: every decision comes from the claims of the verified token, the
runner's settings and the request itself.

Conservative by design, because the proxy forwards the path and the body
byte for byte and the runner (Ollama: Go's ``net/http``, Gin and
``encoding/json``) interprets them, not us:

* Paths arrive in their canonical form (``paths.canonical_path``, applied by
  tree.py: ``/api/%63hat`` is ``/api/chat`` for us and for the runner, and
  dot segments or an encoded ``/`` are refused before this module sees
  them). A request is classified only when its method and path match a
  table row exactly (the query string is ignored, as Gin ignores it).
  ``//api/chat``, ``/api/chat/``, ``/API/chat`` or ``post`` fall through to
  ``admin``.
* Bodies are parsed once, strictly. Go's decoder keeps the *last* of
  repeated keys and matches keys case-insensitively (``"Model"`` and even
  ``"\\u017fource"`` land in ``Model`` / ``Source``), so a body that repeats a
  key, or holds two top-level keys Go would fold together, is refused (400)
  rather than guessed at.
* When a check cannot be made (no model named, a Modelfile, a path the
  table does not know) a token limited to certain models is refused.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import unquote_to_bytes

from runner_gateway.settings import AuthorizationSettings, EndpointRule, RunnerSettings

__all__ = [
    "ADMIN",
    "INFERENCE",
    "MODELS_MANAGE",
    "MODELS_READ",
    "ROUTES",
    "BadRequest",
    "ClaimError",
    "Decision",
    "Endpoint",
    "Grant",
    "Listing",
    "ModelSource",
    "Policy",
    "Route",
    "classify",
    "extract_models",
    "filter_listing",
    "go_fold",
    "grant_from_claims",
    "parse_body",
    "route_label",
]

INFERENCE = "inference"
MODELS_READ = "models:read"
MODELS_MANAGE = "models:manage"
ADMIN = "admin"

# Longest model name echoed back in an error message.
_ECHO_MAX = 120


class ModelSource(enum.Enum):
    """Where a route names the model(s) it acts on."""

    NONE = "none"  # names no model: /, /api/version
    BODY = "body"  # top-level JSON keys (Route.keys)
    PATH = "path"  # the last path segment: /v1/models/{model}
    LISTING = "listing"  # lists models: filtered to the allowed ones
    BLOB = "blob"  # content-addressed upload: never parsed
    UNKNOWN = "unknown"  # not in the table: any key might name a model


class Listing(enum.Enum):
    """The JSON shapes of model listings."""

    OLLAMA = "ollama"  # {"models": [{"name": ..., "model": ...}]}  (/api/tags, /api/ps)
    OPENAI = "openai"  # {"object": "list", "data": [{"id": ...}]}  (/v1/models)


@dataclass(frozen=True)
class Route:
    """One row of the built-in endpoint table.

    ``path`` is exact, or ends in a ``{param}`` segment matching one path
    segment. ``keys`` are the top-level body keys that name models;
    ``opaque`` are keys whose presence means models are named in a way the
    gateway cannot check (refused for tokens limited to certain models).
    """

    methods: frozenset[str]
    path: str
    scope: str
    models: ModelSource = ModelSource.NONE
    keys: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()
    listing: Listing | None = None


def _route(
    methods: str,
    path: str,
    scope: str,
    models: ModelSource = ModelSource.NONE,
    keys: tuple[str, ...] = (),
    opaque: tuple[str, ...] = (),
    listing: Listing | None = None,
) -> Route:
    return Route(frozenset(methods.split()), path, scope, models, keys, opaque, listing)


_B = ModelSource.BODY
_MODEL = ("model",)
# Ollama still accepts the deprecated "name" as an alias of "model" on these
# (it uses "model" when both are set): both are checked when present.
_MODEL_OR_NAME = ("model", "name")

# THE endpoint table (issue 5). Anything not listed here is admin-only.
ROUTES: tuple[Route, ...] = (
    # inference
    _route("POST", "/api/generate", INFERENCE, _B, _MODEL),
    _route("POST", "/api/chat", INFERENCE, _B, _MODEL),
    _route("POST", "/api/embed", INFERENCE, _B, _MODEL),
    _route("POST", "/api/embeddings", INFERENCE, _B, _MODEL),
    _route("POST", "/v1/chat/completions", INFERENCE, _B, _MODEL),
    _route("POST", "/v1/completions", INFERENCE, _B, _MODEL),
    _route("POST", "/v1/embeddings", INFERENCE, _B, _MODEL),
    _route("POST", "/v1/responses", INFERENCE, _B, _MODEL),
    _route("POST", "/v1/messages", INFERENCE, _B, _MODEL),
    # models:read
    _route("GET HEAD", "/", MODELS_READ),
    _route("GET HEAD", "/api/version", MODELS_READ),
    _route("GET HEAD", "/api/tags", MODELS_READ, ModelSource.LISTING, listing=Listing.OLLAMA),
    _route("GET HEAD", "/api/ps", MODELS_READ, ModelSource.LISTING, listing=Listing.OLLAMA),
    _route("POST", "/api/show", MODELS_READ, _B, _MODEL_OR_NAME),
    _route("GET", "/v1/models", MODELS_READ, ModelSource.LISTING, listing=Listing.OPENAI),
    _route("GET", "/v1/models/{model}", MODELS_READ, ModelSource.PATH),
    # models:manage
    _route("POST", "/api/pull", MODELS_MANAGE, _B, _MODEL_OR_NAME),
    _route("POST", "/api/push", MODELS_MANAGE, _B, _MODEL_OR_NAME),
    # "from" names the base model; old Ollama versions took a whole
    # Modelfile (FROM lines inside), which we do not try to parse.
    _route("POST", "/api/create", MODELS_MANAGE, _B, (*_MODEL_OR_NAME, "from"), ("modelfile",)),
    _route("POST", "/api/copy", MODELS_MANAGE, _B, ("source", "destination")),
    _route("DELETE", "/api/delete", MODELS_MANAGE, _B, _MODEL_OR_NAME),
    _route("HEAD POST", "/api/blobs/{digest}", MODELS_MANAGE, ModelSource.BLOB),
)

# For endpoints the gateway does not know: every key a known route names
# models with, and every opaque one.
_ALL_MODEL_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys(k for r in ROUTES for k in r.keys)  # ordered, unique
)
_ALL_OPAQUE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for r in ROUTES for k in r.opaque))

_EXACT: dict[str, list[Route]] = {}
_PARAM: dict[str, list[Route]] = {}  # prefix (with trailing "/") -> routes
for _r in ROUTES:
    if _r.path.endswith("}"):
        _PARAM.setdefault(_r.path[: _r.path.rindex("/") + 1], []).append(_r)
    else:
        _EXACT.setdefault(_r.path, []).append(_r)

# A blob digest as Ollama writes it (sha256:<hex>, or sha256-<hex>); anything
# else under /api/blobs/ is not the blob route for us.
_DIGEST = re.compile(r"[A-Za-z0-9]+[:-][A-Za-z0-9]+")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


# ----------------------------------------------------------- classification


@dataclass(frozen=True)
class Endpoint:
    """What a (method, path) is, for one runner."""

    scope: str
    route: str  # bounded metrics label
    models: ModelSource
    keys: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()
    listing: Listing | None = None
    path_model: str | None = None  # for ModelSource.PATH


_UNKNOWN = Endpoint(ADMIN, "other", ModelSource.UNKNOWN, _ALL_MODEL_KEYS, _ALL_OPAQUE_KEYS)

# The exact rows by (method, path), first row wins as in _builtin: one dict
# lookup instead of a scan and a new Endpoint (frozen, so shared) per request.
_EXACT_ENDPOINTS: dict[tuple[str, str], Endpoint] = {}
for _r in ROUTES:
    if not _r.path.endswith("}"):
        for _m in _r.methods:
            _EXACT_ENDPOINTS.setdefault(
                (_m, _r.path),
                Endpoint(_r.scope, _r.path, _r.models, _r.keys, _r.opaque, _r.listing),
            )


def _text(value: bytes | str) -> str | None:
    """Method or path as text; None when not plain ASCII (never in the table)."""
    if isinstance(value, str):
        return value if value.isascii() else None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def _split_path(path: bytes | str) -> str | None:
    text = _text(path)
    if text is None:
        return None
    return text.partition("?")[0]


def _path_param(segment: str, route: Route) -> str | None:
    """The decoded ``{param}`` segment, or None when it is not a plain one.

    Go decodes the path before Gin routes it, so the runner sees the decoded
    value; a segment that decodes to something with ``/`` in it (or to a dot
    segment) would be routed elsewhere, so it does not match.
    """
    if not segment or _PERCENT.search(segment):
        return None
    if route.models is ModelSource.BLOB:
        return segment if _DIGEST.fullmatch(segment) else None
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if decoded in ("", ".", "..") or "/" in decoded or not decoded.isprintable():
        return None
    return decoded


def _builtin(method: str, path: str) -> Endpoint | None:
    exact = _EXACT_ENDPOINTS.get((method, path))
    if exact is not None:
        return exact
    for route in _EXACT.get(path, ()):
        if method in route.methods:
            return Endpoint(
                route.scope, route.path, route.models, route.keys, route.opaque, route.listing
            )
    head, sep, last = path.rpartition("/")
    for route in _PARAM.get(head + sep, ()):
        if method in route.methods:
            value = _path_param(last, route)
            if value is None:
                continue
            return Endpoint(
                route.scope,
                route.path,
                route.models,
                route.keys,
                route.opaque,
                route.listing,
                path_model=value if route.models is ModelSource.PATH else None,
            )
    return None


def _clean_below(rest: str) -> bool:
    """True when a path below a prefix rule cannot climb out of it upstream."""
    lowered = rest.lower()
    if "\\" in rest or any(bad in lowered for bad in ("%2e", "%2f", "%5c")):
        return False
    segments = rest.split("/")
    return all(s not in ("", ".", "..") for s in segments)


def _rule_matches(rule: EndpointRule, method: str, path: str) -> bool:
    if method not in rule.methods:
        return False
    if rule.path.endswith("/*"):
        base = rule.path[:-2]
        if path == base or path == base + "/":
            return True
        return path.startswith(base + "/") and _clean_below(path[len(base) + 1 :])
    return path == rule.path


def _override(rules: Iterable[EndpointRule], method: str, path: str) -> Endpoint | None:
    for rule in rules:
        if _rule_matches(rule, method, path):
            known = _builtin(method, path)
            if known is not None:
                # Same request shape as on Ollama: keep how it names models.
                return Endpoint(
                    rule.scope,
                    rule.path,
                    known.models,
                    known.keys,
                    known.opaque,
                    known.listing,
                    known.path_model,
                )
            return Endpoint(
                rule.scope, rule.path, ModelSource.UNKNOWN, _ALL_MODEL_KEYS, _ALL_OPAQUE_KEYS
            )
    return None


def classify(
    method: bytes | str, path: bytes | str, rules: tuple[EndpointRule, ...] = ()
) -> Endpoint:
    """Classify a request by method and runner-relative path (query ignored).

    With ``rules`` (a runner's ``endpoints`` setting) those replace the
    built-in table: they are tried in order, the first match wins, and
    anything unmatched is admin.
    """
    method_text = _text(method)
    path_text = _split_path(path)
    if method_text is None or path_text is None:
        return _UNKNOWN
    found = _override(rules, method_text, path_text) if rules else _builtin(method_text, path_text)
    return found if found is not None else _UNKNOWN


def route_label(
    method: bytes | str, path: bytes | str, rules: tuple[EndpointRule, ...] = ()
) -> str:
    """A bounded metrics label: the table's path template, or "other"."""
    return classify(method, path, rules).route


# ------------------------------------------------------------------- grants


class ClaimError(Exception):
    """A token claim has the wrong type; the message names the claim."""


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ollama_forms(name: str) -> set[str]:
    """Spellings Ollama resolves to the same model as ``name`` (lowercased).

    Ollama fills in the default registry, namespace and tag, and looks names
    up without regard to ASCII case; checking every equivalent spelling keeps
    ``llama3``, ``llama3:latest`` and ``library/llama3`` the same model for a
    pattern, in whichever form it was written.
    """
    base = name.translate(_ASCII_LOWER)
    forms = {base}
    if base.startswith("registry.ollama.ai/"):
        forms.add(base[len("registry.ollama.ai/") :])
    for form in list(forms):
        if form.startswith("library/"):
            forms.add(form[len("library/") :])
    for form in list(forms):
        last = form.rpartition("/")[2]
        if ":" not in last and "@" not in last:
            forms.add(form + ":latest")
        elif form.endswith(":latest"):
            forms.add(form[: -len(":latest")])
    return forms


@dataclass(frozen=True)
class Grant:
    """What a token allows. ``None`` means "no limit" for models and runners."""

    scopes: frozenset[str]
    models: tuple[str, ...] | None = None
    runners: tuple[str, ...] | None = None

    def allows_scope(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    def allows_runner(self, name: str) -> bool:
        return self.runners is None or name in self.runners

    def allows_model(self, name: str, ollama: bool = True) -> bool:
        """Glob match (fnmatch: ``*`` also matches ``/``).

        With ``ollama`` (runners on the built-in table), Ollama's naming
        rules apply: ASCII case-insensitive, default tag and namespace
        filled in. Otherwise the match is exact and case-sensitive.
        """
        if self.models is None:
            return True
        if not ollama:
            return any(fnmatchcase(name, p) for p in self.models)
        forms = _ollama_forms(name)
        patterns = [p.translate(_ASCII_LOWER) for p in self.models]
        return any(fnmatchcase(f, p) for f in forms for p in patterns)


def _str_list(claims: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    if key not in claims:
        return None
    value = claims[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClaimError(f"token claim {key!r} must be a list of strings")
    return tuple(value)


def grant_from_claims(claims: Mapping[str, Any], authorization: AuthorizationSettings) -> Grant:
    """Read ``scope``, ``models`` and ``runners``; ClaimError when ill-typed.

    A missing ``scope`` gets ``authorization.defaultScopes``; an empty one
    grants nothing. Unknown scope names are ignored (tokens may carry scopes
    meant for other services).
    """
    if "scope" in claims:
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise ClaimError("token claim 'scope' must be a space-separated string")
        scopes = frozenset(s for s in scope.split(" ") if s)
    else:
        scopes = frozenset(authorization.default_scopes)
    return Grant(scopes, _str_list(claims, "models"), _str_list(claims, "runners"))


# -------------------------------------------------------------------- bodies


class BadRequest(Exception):
    """The body cannot be checked safely (400); the message says why."""


_GO_FOLD_SPECIAL = {"\u212a": "K", "\u017f": "S", "\u0130": "I", "\u0131": "I"}


def go_fold(key: str) -> str:
    """Go's ``encoding/json`` key folding: keys that fold equal fill the same field.

    ASCII is upper-cased; the four non-ASCII letters whose simple case
    mapping is ASCII (Kelvin sign, long s, dotted and dotless i) fold onto
    it, as Go's ``unicode.ToUpper(unicode.ToLower(r))`` does.
    """
    if key.isascii():
        return key.upper()  # the usual case: same as the loop below, at C speed
    out = []
    for ch in key:
        if ch.isascii():
            out.append(ch.upper())
        elif ch in _GO_FOLD_SPECIAL:
            out.append(_GO_FOLD_SPECIAL[ch])
        else:
            folded = ch.lower().upper()
            out.append(folded if len(folded) == 1 else ch)
    return "".join(out)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # a key repeated: name the first one
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadRequest(f"duplicate key {_quote(key)} in the JSON body")
            seen.add(key)
    return value


def _no_constants(name: str) -> Any:
    raise BadRequest(f"invalid JSON body: {name} is not JSON")


# Built once: json.loads with hooks makes a new decoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constants)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``: the same value, or the same JSONDecodeError.

    Without decode()'s two regular-expression matches for the surrounding
    whitespace: they cost as much as scanning a small body (2 of 4 µs), and
    ten times that on a request that finds the caches cold.
    """
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _SCAN(text, start)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    tail = text[end:]
    rest = tail.lstrip(_JSON_SPACE)
    if rest:
        raise json.JSONDecodeError("Extra data", text, end + len(tail) - len(rest))
    return value


def parse_body(body: bytes) -> Any:
    """Parse strictly: UTF-8, no NaN/Infinity, no key repeated in any object.

    Also refuses two top-level keys that Go would fold into the same field
    (``model`` and ``Model``). Raises BadRequest.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid JSON body: not UTF-8") from None
    try:
        value = _decode(text)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits
        raise BadRequest(f"invalid JSON body: {_reason(exc)}") from None
    if isinstance(value, dict):
        folded: dict[str, str] = {}
        for key in value:
            fold = key.upper() if key.isascii() else go_fold(key)  # go_fold's usual case inline
            if fold in folded:
                raise BadRequest(
                    f"keys {_quote(folded[fold])} and {_quote(key)} both set the same "
                    "field (JSON keys are matched case-insensitively upstream)"
                )
            folded[fold] = key
    return value


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at offset {exc.pos}"
    return "number too large"


def _quote(text: str) -> str:
    if len(text) > _ECHO_MAX:
        text = text[:_ECHO_MAX] + "..."
    return json.dumps(text)


def extract_models(
    value: Any, keys: tuple[str, ...], opaque: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """The model names a parsed body gives in ``keys``, and the opaque keys present.

    Keys are looked up as Go would (folded); ``null`` counts as absent (Go
    leaves the field unset). A non-string value is a BadRequest.
    """
    if not isinstance(value, dict):
        if keys:
            raise BadRequest("the JSON body must be an object")
        return [], []
    # go_fold, with its ASCII case inline: every key of every checked body.
    by_fold = {}
    for k in value:
        by_fold[k.upper() if k.isascii() else go_fold(k)] = k
    models: list[str] = []
    for key in keys:
        actual = by_fold.get(key.upper() if key.isascii() else go_fold(key))
        if actual is None or value[actual] is None:
            continue
        name = value[actual]
        if not isinstance(name, str):
            raise BadRequest(f"{_quote(key)} must be a string")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{_quote(key)} is not valid Unicode") from None
        models.append(name)
    if not opaque:
        return models, []
    present = [
        k for k in opaque if go_fold(k) in by_fold and value[by_fold[go_fold(k)]] is not None
    ]
    return models, present


# ------------------------------------------------------------------ listings


def _empty_listing(kind: Listing) -> bytes:
    if kind is Listing.OPENAI:
        return b'{"object":"list","data":[]}'
    return b'{"models":[]}'


def filter_listing(kind: Listing, grant: Grant, ollama: bool = True) -> Callable[[bytes], bytes]:
    """A transform that rebuilds a listing from the entries the grant allows.

    The answer is made anew, not edited: ``{"object": "list", "data": [...]}``
    for OpenAI's shape, ``{"models": [...]}`` for Ollama's, and every other
    member the runner sent is dropped (llama.cpp's server puts an Ollama-style
    ``models`` array beside OpenAI's ``data``: patching ``data`` alone passed
    it on). Anything unexpected (invalid JSON, another shape, an error
    object) becomes an empty listing: better an empty list than a leak.
    """
    list_key, name_keys = (
        ("data", ("id",)) if kind is Listing.OPENAI else ("models", ("name", "model"))
    )

    def allowed(entry: object) -> bool:
        if not isinstance(entry, dict):
            return False
        names = [entry[k] for k in name_keys if k in entry]
        return bool(names) and all(
            isinstance(n, str) and grant.allows_model(n, ollama) for n in names
        )

    def transform(body: bytes) -> bytes:
        try:
            value = parse_body(body)
        except BadRequest:
            return _empty_listing(kind)
        if not isinstance(value, dict) or not isinstance(value.get(list_key), list):
            return _empty_listing(kind)
        entries = [e for e in value[list_key] if allowed(e)]
        rebuilt = (
            {"object": "list", "data": entries} if kind is Listing.OPENAI else {"models": entries}
        )
        return json.dumps(rebuilt, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    return transform


# ------------------------------------------------------------------ decision


@dataclass(frozen=True)
class Decision:
    """The outcome for one request. ``status`` is 200 when allowed."""

    status: int
    route: str
    scope: str  # what the endpoint needs
    message: str = ""
    # Why a 403: "scope" (the token lacks ``scope``), "runner", "model", or
    # "claims" (the token's claims cannot be read); RFC 6750's scope= is for
    # the first only.
    refused: str = ""
    model: str | None = None  # first model named, when allowed
    transform: Callable[[bytes], bytes] | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200


_GRANTS_KEPT = 10_000  # Policy.grant's entries: as many as the token cache keeps by default
_ENDPOINTS_KEPT = 1_000  # Policy.classify's entries, each for a path of at most
_ENDPOINT_PATH_KEPT = 256  # this many characters


class Policy:
    """The endpoint table of one runner plus the default scopes."""

    def __init__(self, runner: RunnerSettings, authorization: AuthorizationSettings) -> None:
        self.runner = runner
        self.authorization = authorization
        self.rules = runner.endpoints
        # Ollama's naming rules only where the built-in (Ollama) table is used.
        self.ollama = not runner.endpoints
        self._grants: dict[int, tuple[Mapping[str, Any], Grant | ClaimError]] = {}
        self._endpoints: dict[tuple[bytes | str, bytes | str], Endpoint] = {}

    def classify(self, method: bytes | str, path: bytes | str) -> Endpoint:
        """:func:`classify` with this runner's rules, kept per method and path:
        most requests go to a handful of endpoints."""
        key = (method, path)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = classify(method, path, self.rules)
            if len(path) <= _ENDPOINT_PATH_KEPT:  # bounded: a long query is not kept
                if len(self._endpoints) >= _ENDPOINTS_KEPT:
                    self._endpoints.clear()  # many distinct paths (model names, queries)
                self._endpoints[key] = endpoint
        return endpoint

    def grant(self, claims: Mapping[str, Any]) -> Grant | ClaimError:
        """:func:`grant_from_claims`, read once per claims object.

        A cached token brings the same claims object with every request.
        Keyed by identity: the entry holds the claims, so their id cannot be
        taken by another object while the entry exists.
        """
        entry = self._grants.get(id(claims))
        if entry is not None and entry[0] is claims:
            return entry[1]
        grant: Grant | ClaimError
        try:
            grant = grant_from_claims(claims, self.authorization)
        except ClaimError as exc:
            grant = exc
        if len(self._grants) >= _GRANTS_KEPT:
            self._grants.clear()
        self._grants[id(claims)] = (claims, grant)
        return grant

    def decide(
        self,
        method: bytes | str,
        path: bytes | str,
        claims: Mapping[str, Any] | None,
        read_body: Callable[[], bytes],
    ) -> Decision:
        """Decide; ``read_body`` is called at most once, only when needed."""
        endpoint = self.classify(method, path)
        route, scope = endpoint.route, endpoint.scope

        def refuse(message: str, refused: str = "model", status: int = 403) -> Decision:
            return Decision(status, route, scope, message, refused=refused if status == 403 else "")

        grant = self._grant_for(method, endpoint, claims)
        if isinstance(grant, Decision):
            return grant
        restricted = grant.models is not None
        source = endpoint.models

        if source in (ModelSource.NONE, ModelSource.BLOB):
            return Decision(200, route, scope)
        if source is ModelSource.LISTING:
            # HEAD too: the proxy asks for the listing and answers with the
            # filtered one's length (the runner's would tell what was cut).
            transform = None
            if restricted and endpoint.listing is not None:
                transform = filter_listing(endpoint.listing, grant, self.ollama)
            return Decision(200, route, scope, transform=transform)
        if source is ModelSource.PATH:
            assert endpoint.path_model is not None
            models = [endpoint.path_model]
        elif source is ModelSource.UNKNOWN and not restricted:
            # Unknown endpoints: nothing to check, so the body is not read.
            return Decision(200, route, scope)
        elif endpoint is _UNKNOWN:
            # Not in the table (nor a runner rule): which models such a path
            # touches cannot be known, whatever the body says.
            return refuse(
                "this token is limited to certain models and this endpoint's models "
                "cannot be checked"
            )
        else:
            body = read_body()
            opaque: list[str] = []
            if not body.strip(b" \t\r\n"):
                models = []
            else:
                try:
                    models, opaque = extract_models(
                        parse_body(body), endpoint.keys, endpoint.opaque
                    )
                except BadRequest as exc:
                    return refuse(str(exc), status=400)
            if opaque and restricted:
                return refuse(
                    f"this token is limited to certain models and {_quote(opaque[0])} "
                    "cannot be checked; name models explicitly"
                )
        if restricted:
            if not models:
                return refuse("this token is limited to certain models; the request names none")
            for name in models:
                if not grant.allows_model(name, self.ollama):
                    return refuse(f"this token may not use model {_quote(name)}")
        return Decision(200, route, scope, model=models[0][:200] if models else None)

    def decide_head(
        self, method: bytes | str, path: bytes | str, claims: Mapping[str, Any] | None
    ) -> Decision | None:
        """The refusal decidable from the request head alone (claims, runner,
        scope), or None: what needs the body (the models) is left to
        :meth:`decide`."""
        found = self._grant_for(method, self.classify(method, path), claims)
        return found if isinstance(found, Decision) else None

    def _grant_for(
        self, method: bytes | str, endpoint: Endpoint, claims: Mapping[str, Any] | None
    ) -> Grant | Decision:
        """The token's grant for ``endpoint``, or the 403 refusing it."""
        route, scope = endpoint.route, endpoint.scope
        if claims is None:
            return Decision(403, route, scope, "the request carries no verified token", "claims")
        grant = self.grant(claims)
        if isinstance(grant, ClaimError):
            return Decision(403, route, scope, str(grant), "claims")
        if not grant.allows_runner(self.runner.name):
            message = f"this token may not use runner {_quote(self.runner.name)}"
            return Decision(403, route, scope, message, "runner")
        if not grant.allows_scope(scope):
            what = "this endpoint" if route == "other" else f"{_text(method)} {route}"
            return Decision(403, route, scope, f"{what} needs the {scope!r} scope", "scope")
        return grant
