"""XChaCha20 (draft-irtf-cfrg-xchacha): HChaCha20 in Python, then ChaCha20.

PyNaCl exposes XChaCha20 only inside the Poly1305 AEAD, and v4.local needs
the bare stream cipher. HChaCha20 is one 20-round ChaCha permutation over 16
words without the final addition, cheap enough in pure Python; the bulk
keystream comes from pyca/cryptography's ChaCha20.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["hchacha20", "xchacha20_xor"]

_MASK = 0xFFFFFFFF
# "expand 32-byte k" as four little-endian words.
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & _MASK


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _MASK
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _MASK
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotl(s[b] ^ s[c], 7)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """Derive a 32-byte subkey from a 32-byte key and a 16-byte nonce."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("HChaCha20 needs a 32-byte key and a 16-byte nonce")
    state = [*_SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]
    for _ in range(10):
        _quarter_round(state, 0, 4, 8, 12)
        _quarter_round(state, 1, 5, 9, 13)
        _quarter_round(state, 2, 6, 10, 14)
        _quarter_round(state, 3, 7, 11, 15)
        _quarter_round(state, 0, 5, 10, 15)
        _quarter_round(state, 1, 6, 11, 12)
        _quarter_round(state, 2, 7, 8, 13)
        _quarter_round(state, 3, 4, 9, 14)
    return struct.pack("<8I", *state[0:4], *state[12:16])


def xchacha20_xor(key: bytes, nonce24: bytes, data: bytes, counter: int = 0) -> bytes:
    """XOR ``data`` with the XChaCha20 keystream starting at block ``counter``.

    Encryption and decryption are the same operation.
    """
    if len(key) != 32 or len(nonce24) != 24:
        raise ValueError("XChaCha20 needs a 32-byte key and a 24-byte nonce")
    if not 0 <= counter <= _MASK:
        raise ValueError("block counter out of range")
    subkey = hchacha20(key, nonce24[:16])
    # cryptography's 16-byte ChaCha20 "nonce" is the 4-byte little-endian block
    # counter followed by the 12-byte IETF nonce, here 0x00000000 || n[16:24].
    iv = counter.to_bytes(4, "little") + bytes(4) + nonce24[16:]
    encryptor = Cipher(algorithms.ChaCha20(subkey, iv), mode=None).encryptor()
    return encryptor.update(data) + encryptor.finalize()
