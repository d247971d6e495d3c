"""Photos for simulated devices: valid JPEGs of realistic, varied sizes, each one distinct.

A small real JPEG (an 8x8 grey image) carries its bulk in comment segments
(``FF FE``) of random bytes: every decoder shows the image and skips the
comments, and the bytes do not compress (as a camera's entropy-coded data does
not). The bytes are slices of one random pool at random places, each segment
led by a fresh 16-byte nonce, so no two photos are alike and making one costs
little more than copying it: the simulator is never the bottleneck.

Sizes: most photos near the mean (log-normal, sigma 0.3); a few percent several
times larger, as a detailed scene or a camera's full-resolution shot would be.
"""

from __future__ import annotations

import math
import random

# A complete baseline JPEG of an 8x8 mid-grey image (SOI, APP0, DQT, SOF0, DHT, SOS, EOI).
BASE_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f14"
    "1d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b080008000801011100"
    "ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000"
    "017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a"
    "3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596"
    "9798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2"
    "f3f4f5f6f7f8f9faffda0008010100003f00fbd3ffd9"
)
MIN_SIZE = 10_000
SEGMENT_MAX = 65533  # bytes of data one comment segment holds (its length field counts itself)
LARGE_SHARE = 0.03  # photos several times the mean
LARGE_FACTOR = (3.0, 8.0)
SIGMA = 0.3
POOL_BYTES = 4 * 2**20
NONCE_BYTES = 16


class JpegMaker:
    def __init__(self, mean_size: int, *, max_size: int = 16 * 2**20, rng: random.Random | None = None) -> None:
        if mean_size < MIN_SIZE:
            raise ValueError(f"a mean photo size below {MIN_SIZE} bytes is not a camera's")
        self.mean_size = mean_size
        self.max_size = max_size
        self._rng = rng or random.Random()
        # The typical photo's median, so that the mean over all photos is mean_size.
        typical_mean = mean_size * (1 - LARGE_SHARE * sum(LARGE_FACTOR) / 2) / (1 - LARGE_SHARE)
        self._mu = math.log(typical_mean) - SIGMA**2 / 2
        self._pool = self._rng.randbytes(POOL_BYTES + SEGMENT_MAX)

    def size(self) -> int:
        """A photo size drawn from the site's mix."""
        if self._rng.random() < LARGE_SHARE:
            size = self.mean_size * self._rng.uniform(*LARGE_FACTOR)
        else:
            size = self._rng.lognormvariate(self._mu, SIGMA)
        return int(min(self.max_size, max(MIN_SIZE, size)))

    def make(self, size: int | None = None) -> bytes:
        """A distinct, valid JPEG of ``size`` bytes (drawn from the mix when not given)."""
        target = self.size() if size is None else max(size, len(BASE_JPEG) + 4)
        padding = target - len(BASE_JPEG)
        segments = []
        while padding > 0:
            data = min(SEGMENT_MAX, padding - 4)
            if data < 0:  # fewer than 4 bytes left: widen the previous comment instead
                break
            segments.append(self._comment(data))
            padding -= data + 4
        if padding > 0:
            last = segments.pop()
            segments.append(self._comment(len(last) - 4 + padding))
        # Comments go after APP0 (SOI + the 18-byte JFIF header), before the image's own tables.
        return BASE_JPEG[:20] + b"".join(segments) + BASE_JPEG[20:]

    def _comment(self, data: int) -> bytes:
        nonce = self._rng.getrandbits(NONCE_BYTES * 8).to_bytes(NONCE_BYTES, "big")[:data]
        start = self._rng.randrange(POOL_BYTES)
        return b"\xff\xfe" + (data + 2).to_bytes(2, "big") + nonce + self._pool[start:start + data - len(nonce)]
