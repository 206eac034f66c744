"""``kms store replica SRC``: make this home a replica of the cluster home SRC.

A replica's home is a copy of the first home's ``kms.toml`` and certificates, with every
relative path (the PIN file, the SoftHSM configuration, TLS files, the database password
file, ...) made absolute so that it still names the first home's files, and its own listen
address: nothing else. No init, no key copy: the keys stay in the one token (HSM partition)
every replica opens, and the registry and state are in the shared PostgreSQL database.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kms.server.config import CONFIG_FILE, ConfigError, load_config, parse_config
from kms.server.settings import SETTINGS, Kind

# Keys of kms.toml whose values are paths (relative ones are resolved against the home), as
# the settings table declares them.
PATH_KEYS = tuple(dict.fromkeys(s.key for s in SETTINGS if s.kind is Kind.PATH))
# The [server] section: from its header to the next section header (or the end).
SERVER_SECTION = re.compile(r"(?ms)^\[server\][ \t]*$.*?(?=^\[|\Z)")
COPIED_FILES = ("kms-cert.pem", "kms-signing-cert.pem")


class ReplicaError(Exception):
    """The replica home cannot be made; one line."""


def make_replica_home(src: Path, dst: Path, listen: str | None = None) -> Path:
    src, dst = src.absolute(), dst.absolute()
    try:
        config = load_config(src)
    except ConfigError as exc:
        raise ReplicaError(str(exc)) from None
    if config.store.backend != "postgresql":
        raise ReplicaError(
            f"{src} keeps its registry in SQLite: run `kms --home {src} store migrate DSN` "
            "first (replicas share PostgreSQL)"
        )
    if (dst / CONFIG_FILE).exists():
        raise ReplicaError(f"{dst / CONFIG_FILE} exists; refusing to overwrite it")
    text = (src / CONFIG_FILE).read_text(encoding="utf-8")

    def absolute(m: re.Match[str]) -> str:
        value = m.group(3)
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = src / p
        return f'{m.group(1)}{m.group(2)}"{p}"'

    keys = "|".join(PATH_KEYS)
    text = re.sub(rf'(?m)^(\s*(?:{keys}))(\s*=\s*)"([^"\n]*)"', absolute, text)
    if listen is not None:
        # Only [server] listen: [metrics] has a listen key of its own, left as it is.
        section = SERVER_SECTION.search(text)
        new, n = re.subn(r'(?m)^listen\s*=\s*"[^"\n]*"', f'listen = "{listen}"',
                         section.group(0) if section else "")
        if section is None or n != 1:
            raise ReplicaError(f"{src / CONFIG_FILE} has no [server] listen line to replace")
        text = text[: section.start()] + new + text[section.end():]
    try:
        parse_config(text, dst)
    except ConfigError as exc:
        raise ReplicaError(str(exc)) from None
    dst.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    tmp = dst / (CONFIG_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(dst / CONFIG_FILE)
    return dst
