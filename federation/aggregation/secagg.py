"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, honest-but-curious server), as pure state machines.

The coordinator learns only the SUM of the silos' updates, also when silos drop out after masking. Each side is an
object whose methods take and return JSON-able dicts and bytes (no pickle, no sockets, no clocks); the services
carry them over the wire. One client object and one server object per round (fresh keys every round).

Protocol (U1 >= U2 >= U3 are the silos still present after each step; `t` = threshold):

0. ``client.advertise()`` -> ``{"silo_id", "c_pk", "s_pk"}``: two X25519 public keys (c: to encrypt shares between
   silos through the server, s: to agree pairwise mask seeds).
   ``server.add_advertisement(msg)``; once >= t: ``server.roster()`` goes to every silo of U1.
1. ``client.share_keys(roster)`` -> ``{recipient: ciphertext}``: a fresh self-mask seed ``b_u`` and the secret key
   ``s_sk_u`` are split t-of-n with Shamir; each recipient's pair of shares is AES-GCM encrypted under
   ``HKDF(X25519(c_sk_u, c_pk_v))``, so the server cannot read it. ``server.add_shares(sender, cts)``;
   ``server.shares_for(v)`` is sent to each v of U2 (the silos that shared).
2. ``client.mask(shares_for_me, update)`` -> ``bytes``: the update is flattened (sorted keys), clamped to
   ``[-clip_range, clip_range]``, quantised to integers mod 2^k and masked:
   ``y_u = q(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)  (mod 2^k)``.
   ``server.add_masked(sender, y)``.
3. ``client.unmask(survivors)`` -> ``{silo: share}``: for each v of U2, the share of ``b_v`` if v is a survivor
   (in U3), else the share of ``s_sk_v`` (never both for one silo). ``server.add_unmask(sender, shares)``;
   with >= t answers ``server.aggregate()`` rebuilds the survivors' ``b`` and the dropped silos' ``s_sk``, removes
   every leftover mask and returns the float32 SUM of the survivors' updates as a state dict.

Quantisation: with ``n = |U1|`` and ``S = (2^(k-1) - 1 - n) / (n * clip_range)``, a coordinate becomes
``round(clamp(x) * S)``; the sum of n of them never wraps, and the error of the sum is at most ``n / (2 S)`` per
coordinate (about ``n^2 * clip_range / 2^k``: 1.5e-8 for 8 silos, k=32, clip_range 1), plus the float32 rounding
of the returned sum. Values beyond ``clip_range`` are clamped (clip updates first, e.g. with `clip_update`, or
pick a wider range).

Masks are AES-256-CTR key streams keyed by HKDF-SHA256 of the shared secret and the round context. Shamir sharing
is over the prime field 2^521 - 1. Not covered: Bonawitz's consistency-check round and signatures for an actively
malicious server (the transport's CURVE authentication of silos is relied on instead).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.core.errors import ProtocolError

logger = logging.getLogger(__name__)

__all__ = [
    "SecAggConfig",
    "SecAggClient",
    "SecAggServer",
    "shamir_split",
    "shamir_combine",
    "flat_layout",
    "random_bytes_from_seed",
]

PRIME = 2**521 - 1  # a Mersenne prime larger than any 32-byte secret
RandomBytes = Callable[[int], bytes]
Layout = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters every party of one round must share.

    Attributes:
        threshold: t, the number of silos whose help is needed to unmask (>= 2; choose > n/2).
        clip_range: Each coordinate is clamped to [-clip_range, clip_range] before quantisation.
        bits: k in {32, 64}: arithmetic modulo 2^k.
        context: Bound into every key derivation (e.g. "RUN/ROUND") so masks never repeat across rounds.
    """

    threshold: int
    clip_range: float = 1.0
    bits: int = 32
    context: str = ""

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(f"secure aggregation threshold must be >= 2, got {self.threshold}")
        if self.bits not in (32, 64):
            raise ValueError(f"secure aggregation bits must be 32 or 64, got {self.bits}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Numpy dtype of the masked vector."""
        return np.uint32 if self.bits == 32 else np.uint64

    def scale(self, n: int) -> float:
        """Quantisation scale S for n participants (see the module docstring)."""
        return (2 ** (self.bits - 1) - 1 - n) / (n * self.clip_range)


# --------------------------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"secure aggregation: {what} is not valid base64") from exc


def _hkdf(secret: bytes, info: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def _prg(seed: bytes, info: str, n: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """n pseudo-random integers of `dtype` from AES-256-CTR keyed by HKDF(seed, info)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(_hkdf(seed, info)), modes.CTR(b"\x00" * 16)).encryptor()
    width = np.dtype(dtype).itemsize
    stream = encryptor.update(b"\x00" * (n * width)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def shamir_split(secret: bytes, n: int, t: int, rand: RandomBytes = os.urandom) -> list[tuple[int, int]]:
    """Split `secret` (<= 64 bytes) into n shares `(x, y)`, x = 1..n, any t of which rebuild it."""
    if not 1 <= t <= n:
        raise ValueError(f"need 1 <= t <= n, got t={t}, n={n}")
    coeffs = [int.from_bytes(secret, "big")] + [int.from_bytes(rand(66), "big") % PRIME for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_combine(shares: Sequence[tuple[int, int]], length: int = 32) -> bytes:
    """Rebuild a `length`-byte secret from t or more distinct shares (Lagrange interpolation at 0).

    Raises:
        ValueError: for duplicate indices, or when the result is not a `length`-byte value (fewer than t shares
            or corrupted ones, with overwhelming probability).
    """
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("shamir_combine: duplicate share indices")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError(f"shamir_combine: shares do not rebuild a {length}-byte secret (too few or corrupted)")
    return secret.to_bytes(length, "big")


def flat_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """The (key, shape) order in which a state dict is flattened: sorted keys."""
    return [(k, tuple(state[k].shape)) for k in sorted(state)]


def _numel(layout: Layout) -> int:
    return sum(int(np.prod(shape)) for _, shape in layout)


def _quantise(update: Mapping[str, torch.Tensor], layout: Layout, config: SecAggConfig, n: int) -> np.ndarray:
    flat = (
        np.concatenate([update[k].detach().to(torch.float64).reshape(-1).numpy() for k, _ in layout])
        if layout
        else np.zeros(0)
    )
    clipped = np.clip(flat, -config.clip_range, config.clip_range)
    ints = np.rint(clipped * config.scale(n)).astype(np.int64)
    return ints.astype(config.dtype)  # two's complement wrap: negative values become 2^k - |v|


def _dequantise(total: np.ndarray, layout: Layout, config: SecAggConfig, n: int) -> dict[str, torch.Tensor]:
    signed = total.view(np.int32 if config.bits == 32 else np.int64).astype(np.float64) / config.scale(n)
    out, offset = {}, 0
    for key, shape in layout:
        size = int(np.prod(shape))
        out[key] = torch.from_numpy(signed[offset : offset + size].astype(np.float32).reshape(shape))
        offset += size
    return out


def _x25519_private(raw: bytes):  # noqa: ANN202 - cryptography type
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(raw)


def _x25519_public(raw: bytes):  # noqa: ANN202
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


def _public_bytes(private_raw: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return (
        _x25519_private(private_raw)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _agree(private_raw: bytes, public_raw: bytes) -> bytes:
    return _x25519_private(private_raw).exchange(_x25519_public(public_raw))


def _pair_info(config: SecAggConfig, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"fedllm-secagg-pair|{config.context}|{lo}|{hi}"


def _self_info(config: SecAggConfig) -> str:
    return f"fedllm-secagg-self|{config.context}"


def _pair_sign(u: str, v: str) -> int:
    """+1 if u adds the pair mask it shares with v, -1 if it subtracts it (by silo id order)."""
    return 1 if u < v else -1


# --------------------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------------------
class SecAggClient:
    """One silo's side of one round.

    Args:
        silo_id: This silo's id (as the server names it).
        config: Shared round parameters.
        rand: Random byte source (`os.urandom`; inject a seeded one only in tests).
    """

    def __init__(self, silo_id: str, config: SecAggConfig, rand: RandomBytes = os.urandom) -> None:
        self.silo_id = silo_id
        self.config = config
        self._rand = rand
        self._c_sk = rand(32)
        self._s_sk = rand(32)
        self._b = rand(32)
        self._roster: dict[str, dict[str, str]] = {}
        self._received: dict[str, dict[str, str]] = {}  # sender -> {"s_sk": y, "b": y} shares held for it
        self._u2: list[str] = []
        self.phase = "advertise"

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise ProtocolError(
                f"secure aggregation client {self.silo_id!r}: expected step {self.phase!r}, got {phase!r}"
            )

    def advertise(self) -> dict[str, str]:
        """Step 0: this silo's two public keys."""
        self._expect("advertise")
        self.phase = "share_keys"
        c_pk, s_pk = _public_bytes(self._c_sk), _public_bytes(self._s_sk)
        return {"silo_id": self.silo_id, "c_pk": _b64(c_pk), "s_pk": _b64(s_pk)}

    def _enc_key(self, peer: str) -> bytes:
        peer_c_pk = _unb64(self._roster[peer]["c_pk"], f"c_pk of {peer!r}")
        return _hkdf(_agree(self._c_sk, peer_c_pk), f"fedllm-secagg-enc|{self.config.context}")

    def share_keys(self, roster: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Step 1: Shamir-share `s_sk` and `b` among the roster; return `{recipient: ciphertext}` (base64)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._expect("share_keys")
        if self.silo_id not in roster:
            raise ProtocolError(f"secure aggregation: silo {self.silo_id!r} is not in the roster")
        if len(roster) < self.config.threshold:
            raise ProtocolError(f"secure aggregation: roster of {len(roster)} < threshold {self.config.threshold}")
        self._roster = {k: dict(v) for k, v in roster.items()}
        ids = sorted(self._roster)
        s_shares = shamir_split(self._s_sk, len(ids), self.config.threshold, self._rand)
        b_shares = shamir_split(self._b, len(ids), self.config.threshold, self._rand)
        out: dict[str, str] = {}
        for index, peer in enumerate(ids):
            shares = {"s_sk": format(s_shares[index][1], "x"), "b": format(b_shares[index][1], "x")}
            if peer == self.silo_id:
                self._received[peer] = shares
                continue
            body = json.dumps({"from": self.silo_id, "to": peer, **shares}).encode()
            nonce = self._rand(12)
            aad = f"{self.silo_id}->{peer}".encode()
            out[peer] = _b64(nonce + AESGCM(self._enc_key(peer)).encrypt(nonce, body, aad))
        self.phase = "mask"
        return out

    def _decrypt(self, sender: str, ciphertext: str) -> dict[str, str]:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if sender not in self._roster:
            raise ProtocolError(f"secure aggregation: shares from {sender!r}, who is not in the roster")
        raw = _unb64(ciphertext, f"shares from {sender!r}")
        try:
            body = AESGCM(self._enc_key(sender)).decrypt(raw[:12], raw[12:], f"{sender}->{self.silo_id}".encode())
        except InvalidTag as exc:
            raise ProtocolError(f"secure aggregation: shares from {sender!r} fail authentication") from exc
        shares = json.loads(body)
        if shares.get("from") != sender or shares.get("to") != self.silo_id:
            raise ProtocolError(f"secure aggregation: shares from {sender!r} are addressed wrongly")
        return {"s_sk": shares["s_sk"], "b": shares["b"]}

    def mask(self, shares_for_me: Mapping[str, str], update: Mapping[str, torch.Tensor]) -> bytes:
        """Step 2: decrypt the shares others sent, and return this silo's masked, quantised update (bytes, LE).

        Args:
            shares_for_me: `{sender: ciphertext}` from the server (the senders form U2 with this silo).
            update: This silo's update; flattened in sorted key order.
        """
        self._expect("mask")
        for sender, ciphertext in shares_for_me.items():
            self._received[sender] = self._decrypt(sender, ciphertext)
        self._u2 = sorted(set(shares_for_me) | {self.silo_id})
        layout = flat_layout(update)
        n, dtype = len(self._roster), self.config.dtype
        y = _quantise(update, layout, self.config, n)
        numel = y.size
        y = y + _prg(self._b, _self_info(self.config), numel, dtype)
        for peer in self._u2:
            if peer == self.silo_id:
                continue
            seed = _agree(self._s_sk, _unb64(self._roster[peer]["s_pk"], f"s_pk of {peer!r}"))
            pair = _prg(seed, _pair_info(self.config, self.silo_id, peer), numel, dtype)
            y = y + pair if _pair_sign(self.silo_id, peer) > 0 else y - pair
        self.phase = "unmask"
        return y.astype(np.dtype(dtype).newbyteorder("<")).tobytes()

    def unmask(self, survivors: Sequence[str]) -> dict[str, dict[str, str]]:
        """Step 3: for each silo of U2, its `b` share if it survived, else its `s_sk` share.

        Returns:
            `{silo: {"x": index, "kind": "b"|"s_sk", "y": hex}}`.

        Raises:
            ProtocolError: if the survivors are fewer than the threshold or not all in U2.
        """
        self._expect("unmask")
        alive = set(survivors)
        if not alive <= set(self._u2):
            raise ProtocolError(f"secure aggregation: survivors {sorted(alive - set(self._u2))} never shared keys")
        if len(alive) < self.config.threshold:
            raise ProtocolError(f"secure aggregation: {len(alive)} survivors < threshold {self.config.threshold}")
        x = sorted(self._roster).index(self.silo_id) + 1
        out = {}
        for peer in self._u2:
            kind = "b" if peer in alive else "s_sk"
            out[peer] = {"x": str(x), "kind": kind, "y": self._received[peer][kind]}
        self.phase = "done"
        return out


# --------------------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------------------
class SecAggServer:
    """The coordinator's side of one round: routes shares, collects masked vectors, removes the masks.

    Args:
        config: Shared round parameters.
        layout: `flat_layout(global_state)`: the keys and shapes of the updates.
    """

    def __init__(self, config: SecAggConfig, layout: Layout) -> None:
        self.config = config
        self.layout = list(layout)
        self.numel = _numel(self.layout)
        self._keys: dict[str, dict[str, str]] = {}
        self._ciphertexts: dict[str, dict[str, str]] = {}  # sender -> recipient -> ct
        self._masked: dict[str, np.ndarray] = {}
        self._unmask: dict[str, dict[str, dict[str, str]]] = {}
        self._frozen_roster: dict[str, dict[str, str]] | None = None

    def add_advertisement(self, msg: Mapping[str, str]) -> None:
        """Step 0: record a silo's public keys."""
        if self._frozen_roster is not None:
            raise ProtocolError(f"secure aggregation: keys from {msg.get('silo_id')!r} after the roster was sent")
        silo = msg["silo_id"]
        for field in ("c_pk", "s_pk"):
            if len(_unb64(msg[field], f"{field} of {silo!r}")) != 32:
                raise ProtocolError(f"secure aggregation: {field} of {silo!r} is not a 32-byte X25519 key")
        self._keys[silo] = {"c_pk": msg["c_pk"], "s_pk": msg["s_pk"]}

    def roster(self) -> dict[str, dict[str, str]]:
        """U1: every advertised silo's keys (freezes the roster). Raises ProtocolError below the threshold."""
        if len(self._keys) < self.config.threshold:
            raise ProtocolError(
                f"secure aggregation: {len(self._keys)} silos advertised keys, threshold is {self.config.threshold}"
            )
        self._frozen_roster = {k: dict(v) for k, v in self._keys.items()}
        return self._frozen_roster

    def add_shares(self, sender: str, ciphertexts: Mapping[str, str]) -> None:
        """Step 1: a silo's encrypted shares, keyed by recipient."""
        roster = self._frozen_roster or {}
        if sender not in roster or not set(ciphertexts) <= set(roster):
            raise ProtocolError(f"secure aggregation: shares from {sender!r} name silos outside the roster")
        self._ciphertexts[sender] = dict(ciphertexts)

    def shares_for(self, recipient: str) -> dict[str, str]:
        """Step 1 -> 2: `{sender: ciphertext}` addressed to `recipient` (the senders are U2)."""
        return {s: cts[recipient] for s, cts in self._ciphertexts.items() if recipient in cts and s != recipient}

    def add_masked(self, sender: str, masked: bytes) -> None:
        """Step 2: a silo's masked vector."""
        if sender not in self._ciphertexts:
            raise ProtocolError(f"secure aggregation: masked input from {sender!r}, who did not share keys")
        width = np.dtype(self.config.dtype).itemsize
        if len(masked) != self.numel * width:
            raise ProtocolError(
                f"secure aggregation: masked input from {sender!r} has {len(masked)} bytes, "
                f"expected {self.numel * width}"
            )
        self._masked[sender] = np.frombuffer(masked, dtype=np.dtype(self.config.dtype).newbyteorder("<")).astype(
            self.config.dtype
        )

    def survivors(self) -> list[str]:
        """U3: silos whose masked vector arrived (sent to every silo in step 3)."""
        if len(self._masked) < self.config.threshold:
            raise ProtocolError(
                f"secure aggregation: {len(self._masked)} masked inputs < threshold {self.config.threshold}"
            )
        return sorted(self._masked)

    def add_unmask(self, sender: str, shares: Mapping[str, Mapping[str, str]]) -> None:
        """Step 3: a survivor's shares for the others (b of survivors, s_sk of dropped silos)."""
        if sender not in self._masked:
            raise ProtocolError(f"secure aggregation: unmask shares from {sender!r}, who sent no masked input")
        survivors = set(self._masked)
        for silo, share in shares.items():
            expected = "b" if silo in survivors else "s_sk"
            if share.get("kind") != expected:
                raise ProtocolError(
                    f"secure aggregation: {sender!r} sent a {share.get('kind')!r} share for "
                    f"{silo!r}, expected {expected!r}"
                )
        self._unmask[sender] = {k: dict(v) for k, v in shares.items()}

    def _rebuild(self, silo: str, kind: str) -> bytes:
        try:
            shares = [
                (int(s[silo]["x"]), int(s[silo]["y"], 16))
                for s in self._unmask.values()
                if silo in s and s[silo]["kind"] == kind
            ]
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"secure aggregation: a malformed {kind} share for {silo!r}: {exc}") from exc
        if len(shares) < self.config.threshold:
            raise ProtocolError(
                f"secure aggregation: only {len(shares)} {kind} shares for {silo!r}, "
                f"threshold is {self.config.threshold}"
            )
        try:
            return shamir_combine(shares[: self.config.threshold])
        except ValueError as exc:
            raise ProtocolError(f"secure aggregation: cannot rebuild the {kind} of {silo!r}: {exc}") from exc

    def aggregate(self) -> dict[str, torch.Tensor]:
        """The float32 SUM of the survivors' updates, as a state dict shaped by `layout`.

        Raises:
            ProtocolError: with fewer than `threshold` unmask answers.
        """
        if len(self._unmask) < self.config.threshold:
            raise ProtocolError(
                f"secure aggregation: {len(self._unmask)} unmask answers < threshold {self.config.threshold}"
            )
        roster = self._frozen_roster or {}
        dtype = self.config.dtype
        survivors = sorted(self._masked)
        dropped = sorted(set(self._ciphertexts) - set(survivors))  # in U2 but sent no masked vector
        total = np.zeros(self.numel, dtype=dtype)
        for silo in survivors:
            total = total + self._masked[silo]
            total = total - _prg(self._rebuild(silo, "b"), _self_info(self.config), self.numel, dtype)
        for gone in dropped:
            s_sk = self._rebuild(gone, "s_sk")
            for silo in survivors:
                seed = _agree(s_sk, _unb64(roster[silo]["s_pk"], f"s_pk of {silo!r}"))
                pair = _prg(seed, _pair_info(self.config, silo, gone), self.numel, dtype)
                # The survivor added sign(silo, gone) * pair: take it back out.
                total = total - pair if _pair_sign(silo, gone) > 0 else total + pair
        if dropped:
            logger.info("secure aggregation: removed the masks of %d dropped silo(s) %s", len(dropped), dropped)
        return _dequantise(total, self.layout, self.config, len(roster))


def random_bytes_from_seed(seed: int) -> RandomBytes:
    """A deterministic byte source for tests (never for production keys)."""
    rng = np.random.Generator(np.random.PCG64(seed))

    def rand(n: int) -> bytes:
        return rng.bytes(n)

    return rand
