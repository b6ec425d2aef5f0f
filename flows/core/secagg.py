"""Secure aggregation's core (the pairwise masks of Bonawitz et al., CCS 2017): the coordinator learns only the sum.

Every silo holds an X25519 key pair; any two silos derive the same secret from one's private and
the other's public key (Diffie-Hellman), and from it, with HKDF over the run, round, attempt and
the round's silo set, a ChaCha20 key stream as long as the model. Silo a adds the stream it shares
with every b > a and subtracts the one it shares with every b < a: each stream enters the sum once
with + and once with -, so the masks cancel in the sum of all the round's silos and in nothing
less. One masked update alone is indistinguishable from random bytes.

Masks cancel exactly only in integers: each silo sends its example-weighted update
(count x weights) in fixed point (2^-24 steps) as 64-bit integers that wrap around; the sum of the
integers, divided by the total count, is FedAvg's weighted mean to within 2^-25 per weight.

A silo that masked with the others but never delivered leaves its streams in the sum: the
coordinator checks that every silo of the set delivered for the same set and attempt, else redoes
the round's masking without the missing ones (flows.federated.secure). It never unmasks a partial sum.
Uses the `cryptography` package (pyca, on PyPI; already a dependency of Prefect's) for X25519,
HKDF-SHA256 and ChaCha20: audited primitives, not home-made ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

SCALE = float(2**24)
LIMIT = 2.0**62  # headroom in int64 for the sum over silos


def keypair() -> tuple[bytes, bytes]:
    """(private, public) X25519 keys, raw 32 bytes each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    private = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private, key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)


def pair_stream(private: bytes, their_public: bytes, context: bytes, words: int) -> np.ndarray:
    """The uint64 mask stream two silos share: ChaCha20 keyed by HKDF(their DH secret, context)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(their_public))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tunedeck-secagg|" + context).derive(secret)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * words))
    return np.frombuffer(stream, dtype=np.uint64)


def context(run: str, round_: int, attempt: int, peers: list[str]) -> bytes:
    """What the masks are bound to: a redo or another silo set gets fresh masks."""
    return f"{run}|{round_}|{attempt}|{','.join(sorted(peers))}".encode()


def encode(state: Mapping[str, torch.Tensor], count: int) -> np.ndarray:
    """count x the state's values, keys in sorted order, flattened, in fixed point as uint64 (two's complement)."""
    flat = np.concatenate([state[k].detach().to("cpu", torch.float64).numpy().ravel() for k in sorted(state)])
    scaled = np.rint(flat * count * SCALE)
    if np.abs(scaled).max(initial=0.0) >= LIMIT / 64:
        raise ValueError("a weight times the example count is too large for secure aggregation's fixed point")
    return scaled.astype(np.int64).view(np.uint64)


def mask(vector: np.ndarray, me: str, private: bytes, publics: Mapping[str, bytes], ctx: bytes) -> np.ndarray:
    """The silo's encoded update plus its pair streams with every other silo of the round (+ above it, - below)."""
    out = vector.copy()
    for peer in sorted(publics):
        if peer == me:
            continue
        stream = pair_stream(private, publics[peer], ctx, len(vector))
        if me < peer:
            out += stream
        else:
            out -= stream
    return out


def unmask_mean(masked: list[np.ndarray], total: int, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weighted mean from every silo's masked update (all of the round's set, or the result is noise)."""
    summed = np.zeros_like(masked[0])
    for vector in masked:
        summed += vector  # uint64 wraps: the masks cancel modulo 2^64
    values = summed.view(np.int64).astype(np.float64) / SCALE / total
    out, at = {}, 0
    for key in sorted(template):
        like = template[key]
        part = torch.from_numpy(values[at:at + like.numel()].copy()).reshape(like.shape)
        at += like.numel()
        if not (like.is_floating_point() or like.is_complex()):
            part = part.round()
        out[key] = part.to(like.dtype)
    return {key: out[key] for key in template}
