"""PKCS#11 URIs (RFC 7512) naming the KMS's token and its keys, as p11-kit, OpenSSL and GnuTLS
users write them::

    pkcs11:token=kms;serial=1a2b?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kms/pin
    pkcs11:token=kms;object=psk%2Fsip%3Aalice%40example.org;type=secret-key

Path attributes (``;``-separated, RFC 7512 section 2.3) select the token (``token`` = label,
``serial``, ``manufacturer``, ``model``) and a key (``object`` = CKA_LABEL, ``type``, ``id``);
query attributes (``&``-separated) say how to reach it: ``module-path`` (the module file),
``module-name`` (a module found in the usual module folders), ``pin-source``. Values are
percent-encoded UTF-8 (``id`` is raw bytes).

``pin-source`` is a ``file:`` URI or an absolute path (RFC 7512 section 2.3 leaves its form to
the application); this KMS also reads ``env:NAME`` (an environment variable). ``pin-value`` is
refused: the PIN itself must not sit in kms.toml or on a command line (visible in ``ps``).

Pure: no python-pkcs11 here (the configuration parser uses this module).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

SCHEME = "pkcs11:"

PATH_ATTRIBUTES = frozenset({
    "token", "manufacturer", "serial", "model", "library-manufacturer", "library-description",
    "library-version", "object", "type", "id", "slot-description", "slot-manufacturer",
    "slot-id",
})
QUERY_ATTRIBUTES = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})

# RFC 7512 section 2.3: pk11-pchar / pk11-qchar, i.e. unreserved and a few sub-delims; all
# else percent-encoded. Used when we write URIs.
_PATH_SAFE = "-._~:[]@!$'()*+,="
_QUERY_SAFE = "-._~:[]@!$'()*+,=/?|"
_ATTR_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/local/lib/pkcs11",
    "/usr/local/lib/softhsm",
)


class Pkcs11UriError(ValueError):
    """A PKCS#11 URI is malformed or asks for something the KMS refuses (one line, no PIN)."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI (attributes the KMS does not use are kept but ignored)."""

    path: dict[str, bytes]
    query: dict[str, str]

    # --- token ----------------------------------------------------------------------------
    @property
    def token_label(self) -> str | None:
        return self._text("token")

    @property
    def token_serial(self) -> str | None:
        return self._text("serial")

    @property
    def object_label(self) -> str | None:
        return self._text("object")

    @property
    def object_type(self) -> str | None:
        return self._text("type")

    @property
    def module_path(self) -> str | None:
        return self.query.get("module-path")

    @property
    def module_name(self) -> str | None:
        return self.query.get("module-name")

    @property
    def pin_source(self) -> str | None:
        return self.query.get("pin-source")

    def _text(self, name: str) -> str | None:
        raw = self.path.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from None

    def resolve_module(self) -> str | None:
        """The module file: ``module-path``, else ``module-name`` looked up in the usual
        PKCS#11 module folders (as p11-kit does for its registered modules)."""
        if self.module_path is not None:
            return self.module_path
        if self.module_name is None:
            return None
        return find_module(self.module_name)

    def pin_location(self) -> tuple[str | None, str | None]:
        """``(pin_env, pin_file)`` from ``pin-source`` (both None without one)."""
        src = self.pin_source
        if src is None:
            return None, None
        if src.startswith("env:"):
            name = src[4:]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise Pkcs11UriError("pin-source env: needs an environment variable name")
            return name, None
        if src.startswith("file:"):
            rest = src[5:]
            if rest.startswith("//"):  # file://host/path: only the local host
                host, _, p = rest[2:].partition("/")
                if host not in ("", "localhost"):
                    raise Pkcs11UriError("pin-source file: URI must name a local file")
                rest = "/" + p
            if not rest.startswith("/"):
                raise Pkcs11UriError("pin-source file: URI must have an absolute path")
            return None, rest
        if src.startswith("/"):
            return None, src
        raise Pkcs11UriError(
            "pin-source must be a file: URI, an absolute path or env:NAME"
        )


def find_module(name: str) -> str:
    """Path of the module called ``name`` (``softhsm2``, ``libopencryptoki``, ``opensc-pkcs11``
    ...) in the usual module folders; a name with a slash is not looked up."""
    if not name or "/" in name or name.startswith("."):
        raise Pkcs11UriError(f"module-name {name!r} must be a bare module name")
    stems = [name, f"lib{name}"] if not name.startswith("lib") else [name]
    for d in _MODULE_DIRS:
        for stem in stems:
            for candidate in (f"{d}/{stem}.so", *sorted(glob.glob(f"{d}/{stem}.so.*"))):
                if os.path.isfile(candidate):
                    return candidate
    raise Pkcs11UriError(
        f"module-name {name!r} not found in {', '.join(_MODULE_DIRS)} (give module-path)"
    )


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse a PKCS#11 URI (RFC 7512 section 2.3). Raises :class:`Pkcs11UriError`."""
    if not isinstance(text, str) or not text.lower().startswith(SCHEME):
        raise Pkcs11UriError("a PKCS#11 URI starts with 'pkcs11:'")
    body = text[len(SCHEME):]
    if any(c.isspace() for c in body):
        # RFC 7512 section 2.3 allows whitespace only in human-formatted text, not in a URI.
        raise Pkcs11UriError("PKCS#11 URI must not contain whitespace")
    path_part, _, query_part = body.partition("?")
    path: dict[str, bytes] = {}
    for item in filter(None, path_part.split(";")):
        name, value = _attr(item)
        if name in path:
            raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} appears twice")
        if name not in PATH_ATTRIBUTES and not name.startswith("x-"):
            raise Pkcs11UriError(f"unknown PKCS#11 URI path attribute {name!r}")
        path[name] = unquote_to_bytes(value)
    query: dict[str, str] = {}
    for item in filter(None, query_part.split("&")):
        name, value = _attr(item)
        if name == "pin-value":
            raise Pkcs11UriError(
                "pin-value is refused: the PIN must not be written in a URI (use pin-source)"
            )
        if name in query:
            raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} appears twice")
        if name not in QUERY_ATTRIBUTES and not name.startswith("x-"):
            raise Pkcs11UriError(f"unknown PKCS#11 URI query attribute {name!r}")
        try:
            query[name] = unquote_to_bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from None
    uri = Pkcs11Uri(path, query)
    if uri.object_type is not None and uri.object_type not in OBJECT_TYPES:
        raise Pkcs11UriError(
            f"PKCS#11 URI type must be one of {', '.join(sorted(OBJECT_TYPES))}"
        )
    if "module-path" in query and "module-name" in query:
        raise Pkcs11UriError("give module-path or module-name, not both")
    if "module-path" in query and not query["module-path"].startswith("/"):
        raise Pkcs11UriError("module-path must be an absolute path")
    uri.token_label  # noqa: B018 - UTF-8 checks now, not at first use
    uri.token_serial  # noqa: B018
    uri.object_label  # noqa: B018
    uri.pin_location()
    return uri


def _attr(item: str) -> tuple[str, str]:
    name, eq, value = item.partition("=")
    if not eq:
        raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} has no '='")
    name = name.lower()
    if not _ATTR_NAME.match(name):
        raise Pkcs11UriError(f"bad PKCS#11 URI attribute name {name!r}")
    if re.search(r"%(?![0-9A-Fa-f]{2})", value):
        raise Pkcs11UriError(f"bad percent-encoding in PKCS#11 URI attribute {name!r}")
    return name, value


def token_uri(label: str | None, serial: str | None = None, *, module: str | None = None,
              pin_env: str | None = None, pin_file: str | None = None) -> str:
    """The URI naming a token (and, if given, its module and PIN source)."""
    path = []
    if label is not None:
        path.append("token=" + quote(label, safe=_PATH_SAFE))
    if serial is not None:
        path.append("serial=" + quote(serial, safe=_PATH_SAFE))
    query = []
    if module is not None:
        query.append("module-path=" + quote(module, safe=_QUERY_SAFE))
    if pin_file is not None:
        query.append("pin-source=" + quote("file:" + pin_file, safe=_QUERY_SAFE))
    elif pin_env is not None:
        query.append("pin-source=" + quote("env:" + pin_env, safe=_QUERY_SAFE))
    return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")


def key_uri(token_label: str | None, label: str, object_type: str) -> str:
    """The URI naming one key of the token (``object_type``: secret-key, private, public)."""
    parts = []
    if token_label is not None:
        parts.append("token=" + quote(token_label, safe=_PATH_SAFE))
    parts.append("object=" + quote(label, safe=_PATH_SAFE))
    parts.append("type=" + object_type)
    return SCHEME + ";".join(parts)


__all__ = [
    "Pkcs11Uri",
    "Pkcs11UriError",
    "find_module",
    "key_uri",
    "parse_uri",
    "token_uri",
]
