"""CURVE key pairs of the coordinator and silos, and the coordinator's list of enrolled silos, under `keys/`.

Layout (`APPLIANCE_HOME/keys/federation/`): `coordinator.key_secret` + `coordinator.key` (z85), `silo.key_secret` +
`silo.key`, and `enrolled.json` (`{"silo name": "z85 public key"}`, or `{"silo name": {"public_key": KEY,
"num_examples": N}}` for a silo enrolled with the example count it declared). Secret files are mode 0600 and never
logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedllm.core.atomic import write_json_atomic, write_text_atomic
from fedllm.core.errors import ConfigError

logger = logging.getLogger(__name__)

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_SILO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENROLLED_FILE = "enrolled.json"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in z85 text (40 characters each)."""

    public: str
    secret: str

    def __repr__(self) -> str:  # never print the secret
        return f"KeyPair(public={self.public!r}, secret=***)"


def federation_keys_dir(keys_dir: Path) -> Path:
    """`keys/federation/` inside the appliance's keys folder."""
    return Path(keys_dir) / "federation"


def check_public_key(key: str) -> str:
    """Return `key` stripped if it is a z85 CURVE public key, else raise ConfigError."""
    key = key.strip()
    if not _Z85_KEY.match(key):
        raise ConfigError(f"not a CURVE public key: expected 40 z85 characters, got {len(key)} characters")
    return key


def check_silo_name(name: str) -> str:
    """Return `name` if it is a valid silo name, else raise ConfigError."""
    if not _SILO_NAME.match(name):
        raise ConfigError(f"invalid silo name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def ensure_keypair(keys_dir: Path, role: str) -> KeyPair:
    """The key pair of `role` ('coordinator' or 'silo') under `keys_dir/federation/`, created on first use."""
    existing = load_keypair(keys_dir, role)
    if existing is not None:
        return existing
    import zmq

    public, secret = zmq.curve_keypair()
    d = federation_keys_dir(keys_dir)
    secret_path = d / f"{role}.key_secret"
    write_text_atomic(secret_path, secret.decode("ascii") + "\n")
    os.chmod(secret_path, 0o600)
    write_text_atomic(d / f"{role}.key", public.decode("ascii") + "\n")
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def load_keypair(keys_dir: Path, role: str) -> KeyPair | None:
    """The stored key pair of `role`, or None if there is none yet."""
    d = federation_keys_dir(keys_dir)
    if not (d / f"{role}.key_secret").exists():
        return None
    return KeyPair((d / f"{role}.key").read_text().strip(), (d / f"{role}.key_secret").read_text().strip())


def _read_enrolment(keys_dir: Path) -> dict[str, dict]:
    """`enrolled.json` as name -> {"public_key", "num_examples" (None when not declared)}."""
    path = federation_keys_dir(keys_dir) / ENROLLED_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of silo name -> public key, got {type(data).__name__}")
    out = {}
    for name, entry in data.items():
        entry = entry if isinstance(entry, dict) else {"public_key": entry}
        key, count = entry.get("public_key"), entry.get("num_examples")
        if not isinstance(key, str) or (count is not None and (not isinstance(count, int) or count < 1)):
            raise ConfigError(
                f"{path}: the entry of silo {name!r} needs a public_key string and, if given, a "
                f"num_examples integer >= 1"
            )
        out[str(name)] = {"public_key": key, "num_examples": count}
    return out


def _write_enrolment(keys_dir: Path, entries: dict[str, dict]) -> None:
    data = {n: e["public_key"] if e.get("num_examples") is None else e for n, e in entries.items()}
    write_json_atomic(federation_keys_dir(keys_dir) / ENROLLED_FILE, data)


def enrolled_silos(keys_dir: Path) -> dict[str, str]:
    """Enrolled silos: name -> z85 public key (empty if none)."""
    return {name: e["public_key"] for name, e in _read_enrolment(keys_dir).items()}


def declared_examples(keys_dir: Path) -> dict[str, int]:
    """The example counts silos declared when they were enrolled (only those that declared one)."""
    return {
        name: int(e["num_examples"]) for name, e in _read_enrolment(keys_dir).items() if e["num_examples"] is not None
    }


def enroll_silo(keys_dir: Path, name: str, public_key: str, num_examples: int | None = None) -> dict[str, str]:
    """Admit silo `name` with `public_key` (replacing an earlier key of that name); returns the new list.

    Args:
        num_examples: the example count the silo declared; it bounds the weight its updates get in every round.

    Raises:
        ConfigError: invalid name, key or count, or the key is already enrolled under another name.
    """
    name, public_key = check_silo_name(name), check_public_key(public_key)
    if num_examples is not None and num_examples < 1:
        raise ConfigError(f"a declared example count must be at least 1, got {num_examples}")
    entries = _read_enrolment(keys_dir)
    other = [n for n, e in entries.items() if e["public_key"] == public_key and n != name]
    if other:
        raise ConfigError(f"this public key is already enrolled as silo {other[0]!r}; remove it first")
    entries[name] = {"public_key": public_key, "num_examples": num_examples}
    _write_enrolment(keys_dir, entries)
    return {n: e["public_key"] for n, e in entries.items()}


def enroll_silos(keys_dir: Path, silos: dict[str, str]) -> int:
    """Admit many silos (name -> z85 public key) with one write of the enrolment (`enroll_silo`'s checks for each);
    returns how many are enrolled now. Used to enrol hundreds of simulated silos at once.

    Raises:
        ConfigError: an invalid name or key, or a key enrolled under another name.
    """
    entries = _read_enrolment(keys_dir)
    owners = {e["public_key"]: n for n, e in entries.items()}
    for name, public_key in silos.items():
        name, public_key = check_silo_name(name), check_public_key(public_key)
        if owners.get(public_key, name) != name:
            raise ConfigError(f"this public key is already enrolled as silo {owners[public_key]!r}; remove it first")
        entries[name] = {"public_key": public_key, "num_examples": None}
        owners[public_key] = name
    _write_enrolment(keys_dir, entries)
    return len(entries)


def remove_silo(keys_dir: Path, name: str) -> bool:
    """Withdraw silo `name` (a running coordinator drops its session within a second); True if it was enrolled."""
    entries = _read_enrolment(keys_dir)
    if entries.pop(name, None) is None:
        return False
    _write_enrolment(keys_dir, entries)
    return True


class Enrolment:
    """The enrolment as the coordinator reads it: re-read whenever `enrolled.json` changes (a `stat` per check).
    A malformed or unreadable file fails closed: no silo is enrolled until it is fixed (logged once, with its path).

    Args:
        keys_dir: the appliance's keys folder.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = Path(keys_dir)
        self._path = federation_keys_dir(keys_dir) / ENROLLED_FILE
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, dict] = {}
        self._by_key: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if it did."""
        try:
            st = self._path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError:  # e.g. a folder on the way that is not readable: read (and fail) below
            stamp = (-1, -1, -1)
        if stamp == self._stamp and self._stamp is not None:
            return False
        self._stamp = stamp
        try:
            self._entries = _read_enrolment(self.keys_dir)
        except ConfigError as exc:  # fail closed: no silo is accepted until the file is fixed (logged once per change)
            logger.error("%s; no silo is accepted until it is fixed (%s)", exc, self._path)
            self._entries, self._by_key = {}, {}
            return True
        self._by_key = {e["public_key"]: name for name, e in self._entries.items()}
        return True

    def name_of(self, public_key: str) -> str | None:
        """The silo enrolled with `public_key` now, or None."""
        self.refresh()
        return self._by_key.get(public_key)

    def names(self) -> set[str]:
        """Silos enrolled now."""
        self.refresh()
        return set(self._entries)

    def declared_examples(self, name: str) -> int | None:
        """The example count silo `name` declared at enrolment, or None."""
        entry = self._entries.get(name)
        return None if entry is None or entry["num_examples"] is None else int(entry["num_examples"])
