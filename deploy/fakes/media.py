"""Small real media files, made from scratch: a PCM WAV and a PNG that any decoder opens.

The fakes answer speech and image requests with them, and the tests upload them.
"""

from __future__ import annotations

import io
import math
import struct
import wave
import zlib


def wav_bytes(seconds: float, rate: int = 16_000, tone_hz: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV holding a sine tone of ``seconds``."""
    frames = int(seconds * rate)
    samples = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * tone_hz * i / rate)))
                       for i in range(min(frames, rate)))
    whole, rest = divmod(frames, rate)  # repeat one second of tone: fast for long files
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples * whole + samples[: rest * 2])
    return buffer.getvalue()


def png_bytes(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    """An RGB PNG of one colour, with a checksum-valid IHDR, IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))
