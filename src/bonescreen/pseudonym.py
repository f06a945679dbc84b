"""Keyed patient pseudonyms: HMAC-SHA256 of the PatientID under a secret key.

An unkeyed hash of a medical record number is no pseudonym: record numbers come
from a small range, so anyone can hash them all and read the table back. A keyed
hash (HMAC) cannot be reversed without the key, and the same key gives the same
pseudonym for the same patient in every run, so results can still be joined
(a later DXA to an earlier screen, ``bonescreen monitor``) by whoever holds it.

The key is 32 random bytes, stored hex-encoded in a file readable by its owner
only (mode 0600). ``screen`` and the service both call :func:`pseudonymise`;
nothing else in bonescreen hashes a patient identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from bonescreen.errors import BonescreenError

__all__ = [
    "KEY_ENV",
    "PREFIX",
    "PseudonymKeyError",
    "Pseudonymiser",
    "default_key_path",
    "key_fingerprint",
    "load_key",
    "load_or_create_key",
    "pseudonymise",
]

#: Environment variable naming the key file (used when no key file is given).
KEY_ENV = "BONESCREEN_PSEUDONYM_KEY_FILE"
#: Marks a value as a pseudonym (never a raw PatientID).
PREFIX = "p:"
#: Hex characters kept: 80 bits, far beyond any hospital's patient count.
DIGEST_CHARS = 20
MIN_KEY_BYTES = 16


class PseudonymKeyError(BonescreenError):
    """The pseudonym key file is missing, unreadable, too short or readable by others."""

    reason = "bad_pseudonym_key"


def default_key_path() -> Path:
    """``$BONESCREEN_PSEUDONYM_KEY_FILE``, else ``$XDG_CONFIG_HOME/bonescreen/pseudonym.key``.

    A per-user location, not the output folder: results shared with others must not carry
    the key that links them back to patients.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "bonescreen" / "pseudonym.key"


def _decode(raw: bytes, path: Path) -> bytes:
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = text  # any other content: the bytes themselves
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"pseudonym key {path} holds {len(key)} byte(s); at least {MIN_KEY_BYTES} are needed "
            "(delete it to have a new 32-byte key generated, or write 64 hex characters)"
        )
    return key


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read an existing key; refuse a file that group or others can read."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PseudonymKeyError(f"pseudonym key file not found: {p}") from None
    except OSError as exc:
        raise PseudonymKeyError(f"cannot read pseudonym key {p}: {exc.strerror or exc}") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PseudonymKeyError(
            f"pseudonym key {p} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {p}"
        )
    return _decode(raw, p)


def load_or_create_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The key at ``path`` (default :func:`default_key_path`), generated there on first use.

    Created atomically with mode 0600 (``O_EXCL``: two processes starting at once end up
    with the same key, never two).
    """
    p = Path(path).expanduser() if path else default_key_path()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Not bonescreen.fsio: its rename would let a second process replace a key the
        # first one already used; O_EXCL + link keeps whichever was created first.
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)  # fails if another process created the key meanwhile: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return load_key(p)


def pseudonymise(value: str, key: bytes) -> str:
    """``p:`` + the first 20 hex characters of HMAC-SHA256(key, value)."""
    if not key:
        raise PseudonymKeyError("an empty key gives no pseudonym")
    digest = hmac.new(key, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGEST_CHARS]


def key_fingerprint(key: bytes) -> str:
    """A short public name of a key (SHA-256 prefix): tells two keys apart without revealing either."""
    return hashlib.sha256(b"bonescreen-pseudonym-key\0" + key).hexdigest()[:12]


class Pseudonymiser:
    """A loaded key applied to identifiers; ``None`` and empty values stay ``None``."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"a pseudonym key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None = None, *, create: bool = True) -> Pseudonymiser:
        return cls(load_or_create_key(path) if create else load_key(path or default_key_path()))

    def __call__(self, value: str | None) -> str | None:
        if value is None or not str(value).strip():
            return None
        return pseudonymise(str(value), self._key)

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymiser(<key hidden>)"
