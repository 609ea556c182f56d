"""JPEG-LS lossless encoding (ISO 14495-1) of 8-bit grey or RGB samples, for DICOM 1.2.840.10008.1.2.4.80.

The encoder is CharLS, as the pydicom project's pyjpegls bundles it. Its Python
function (jpeg_ls.encode_buffer) wants a `bytes` source and fills a zeroed
destination twice the size of the raw samples, then copies it: for a 100 MP grey
image that is 380 MiB of transient memory on top of the samples (measured: peak
+381 MiB during the call). CharLS's own C API (charls.h, exported by that same
library) lets us hand it any buffer and an anonymous mapping as destination, whose
untouched pages never become resident: the call then costs about the size of its
output. If the C API cannot be found (another build of pyjpegls), encode_buffer is
used instead: same codestream, more memory.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from functools import cache

import numpy as np

log = logging.getLogger(__name__)

_INTERLEAVE_NONE, _INTERLEAVE_SAMPLE = 0, 2


class _FrameInfo(ctypes.Structure):  # charls_frame_info
    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32),
                ("bits_per_sample", ctypes.c_int32), ("component_count", ctypes.c_int32)]


class JpegLsError(RuntimeError):
    """CharLS refused to encode (an error code from charls_jpegls_errc)."""


@cache
def _charls() -> ctypes.CDLL | None:
    try:
        import _CharLS  # pyjpegls's extension: CharLS linked in, its C API exported

        lib = ctypes.CDLL(_CharLS.__file__)
        lib.charls_jpegls_encoder_create.restype = ctypes.c_void_p
        lib.charls_jpegls_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.charls_jpegls_encoder_set_frame_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FrameInfo)]
        lib.charls_jpegls_encoder_set_near_lossless.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.charls_jpegls_encoder_set_interleave_mode.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.charls_jpegls_encoder_get_estimated_destination_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.charls_jpegls_encoder_set_destination_buffer.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.charls_jpegls_encoder_encode_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32]
        lib.charls_jpegls_encoder_get_bytes_written.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        return lib
    except (ImportError, OSError, AttributeError) as exc:
        log.warning("CharLS C API not available (%s): JPEG-LS encoding falls back to jpeg_ls.encode_buffer", exc)
        return None


_DESTINATION_TOO_SMALL = 3  # charls_jpegls_errc destination_buffer_too_small


def _check(code: int, step: str) -> None:
    if code != 0:
        raise JpegLsError(f"JPEG-LS encoder failed at {step} (CharLS error {code})", code)


def encode(samples: np.ndarray, width: int, height: int, components: int) -> bytes:
    """A lossless JPEG-LS codestream of C-contiguous uint8 samples (grey, or RGB interleaved by pixel)."""
    if samples.dtype != np.uint8 or not samples.flags.c_contiguous or samples.size != width * height * components:
        raise ValueError("JPEG-LS source must be C-contiguous 8-bit samples, width x height x components of them")
    lib = _charls()
    if lib is None:
        import jpeg_ls

        return bytes(jpeg_ls.encode_buffer(samples.tobytes(), height, width, components, 8,
                                           interleave_mode=_INTERLEAVE_SAMPLE if components == 3 else None))
    try:
        return _encode_into(lib, samples, width, height, components, None)
    except JpegLsError as exc:
        if exc.args[1:] != (_DESTINATION_TOO_SMALL,):
            raise
    # CharLS's estimate is the raw size: pixels that do not compress (noise: a 3000 x 2000 noise PNG failed) code
    # longer, at most 4 bytes a sample (ITU-T T.87: LIMIT = 32 bits for 8-bit samples)
    return _encode_into(lib, samples, width, height, components, samples.size * 4 + 4096)


def _encode_into(lib: ctypes.CDLL, samples: np.ndarray, width: int, height: int, components: int, room: int | None) -> bytes:
    """Encoded into a destination of `room` bytes (None: CharLS's estimate)."""
    encoder = lib.charls_jpegls_encoder_create()
    if not encoder:
        raise MemoryError("JPEG-LS encoder could not be created")
    try:
        _check(lib.charls_jpegls_encoder_set_frame_info(encoder, ctypes.byref(_FrameInfo(width, height, 8, components))),
               "frame info")
        _check(lib.charls_jpegls_encoder_set_near_lossless(encoder, 0), "near-lossless 0")
        _check(lib.charls_jpegls_encoder_set_interleave_mode(encoder, _INTERLEAVE_SAMPLE if components == 3 else _INTERLEAVE_NONE),
               "interleave mode")
        if room is None:
            estimate = ctypes.c_size_t()
            _check(lib.charls_jpegls_encoder_get_estimated_destination_size(encoder, ctypes.byref(estimate)), "destination size")
            room = estimate.value
        # anonymous mapping: only the pages CharLS writes become resident
        with mmap.mmap(-1, room) as destination:
            # the temporary c_char view is released at once (the mapping can close); its address stays valid
            address = ctypes.addressof(ctypes.c_char.from_buffer(destination))
            _check(lib.charls_jpegls_encoder_set_destination_buffer(encoder, address, room), "destination")
            _check(lib.charls_jpegls_encoder_encode_from_buffer(
                encoder, samples.ctypes.data, samples.size, width * components), "encoding")
            written = ctypes.c_size_t()
            _check(lib.charls_jpegls_encoder_get_bytes_written(encoder, ctypes.byref(written)), "bytes written")
            return destination[: written.value]
    finally:
        lib.charls_jpegls_encoder_destroy(encoder)
