"""Keyed patient pseudonyms (bonescreen.pseudonym)."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading
from pathlib import Path

import pytest

from bonescreen.pseudonym import (
    PREFIX,
    Pseudonymiser,
    PseudonymKeyError,
    key_fingerprint,
    load_key,
    load_or_create_key,
    pseudonymise,
)


def test_hmac_matches_the_standard_and_depends_on_the_key() -> None:
    key = bytes(range(32))
    want = hmac.new(key, b"MRN-0001", hashlib.sha256).hexdigest()[:20]
    assert pseudonymise("MRN-0001", key) == PREFIX + want
    assert pseudonymise(" MRN-0001 ", key) == PREFIX + want  # header padding does not change it
    assert pseudonymise("MRN-0001", bytes(range(1, 33))) != PREFIX + want
    # not the old unkeyed sha256 prefix
    assert want[:16] != hashlib.sha256(b"MRN-0001").hexdigest()[:16]


def test_key_generated_once_with_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "pseudonym.key"
    k1 = load_or_create_key(path)
    assert len(k1) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == k1  # the same key on the next start
    assert load_key(path) == k1


def test_concurrent_first_start_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "pseudonym.key"]  # no temp files left


def test_bad_keys_are_refused_clearly(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("abcd\n")
    os.chmod(short, 0o600)
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        load_key(short)
    public = tmp_path / "public.key"
    public.write_text("00" * 32)
    os.chmod(public, 0o644)
    with pytest.raises(PseudonymKeyError, match="chmod 600"):
        load_key(public)
    with pytest.raises(PseudonymKeyError, match="not found"):
        load_key(tmp_path / "missing.key")


def test_pseudonymiser_hides_key_and_passes_empty_values(tmp_path: Path) -> None:
    p = Pseudonymiser.from_file(tmp_path / "k")
    assert p(None) is None and p("  ") is None
    assert p("A").startswith(PREFIX) and p("A") == p("A") != p("B")
    assert "key hidden" in repr(p)
    k = load_key(tmp_path / "k")
    assert key_fingerprint(k) != key_fingerprint(bytes(32)) and k.hex()[:12] not in key_fingerprint(k)
