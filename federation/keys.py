"""CURVE key pairs of the coordinator and silos, and the coordinator's list of enrolled silos, under `keys/`.

Layout (`APPLIANCE_HOME/keys/federation/`): `coordinator.key_secret` + `coordinator.key` (z85), `silo.key_secret` +
`silo.key`, and `enrolled.json` (`{"silo name": "z85 public key"}`). Secret files are mode 0600 and never logged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.core.atomic import write_json_atomic, write_text_atomic
from appliance.core.errors import ConfigError

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


def enrolled_silos(keys_dir: Path) -> dict[str, str]:
    """Enrolled silos: name -> z85 public key (empty if none)."""
    path = federation_keys_dir(keys_dir) / ENROLLED_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return {str(k): str(v) for k, v in data.items()}


def enroll_silo(keys_dir: Path, name: str, public_key: str) -> dict[str, str]:
    """Admit silo `name` with `public_key` (replacing an earlier key of that name); returns the new list.

    Raises:
        ConfigError: invalid name or key, or the key is already enrolled under another name.
    """
    name, public_key = check_silo_name(name), check_public_key(public_key)
    silos = enrolled_silos(keys_dir)
    other = [n for n, k in silos.items() if k == public_key and n != name]
    if other:
        raise ConfigError(f"this public key is already enrolled as silo {other[0]!r}; remove it first")
    silos[name] = public_key
    write_json_atomic(federation_keys_dir(keys_dir) / ENROLLED_FILE, silos)
    return silos


def remove_silo(keys_dir: Path, name: str) -> bool:
    """Withdraw silo `name`; True if it was enrolled."""
    silos = enrolled_silos(keys_dir)
    if silos.pop(name, None) is None:
        return False
    write_json_atomic(federation_keys_dir(keys_dir) / ENROLLED_FILE, silos)
    return True
