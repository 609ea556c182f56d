"""One file in, everything derived out — no database, no protocol.

Checks (type from content, byte and pixel limits from headers, decodability),
reads the allow-listed EXIF facts, and decides how the pixels go into DICOM:

- upright baseline JPEG, chroma-subsampled or grey: encapsulated as it is, minus
  metadata segments (no decode, no re-encode);
- progressive or EXIF-rotated JPEG: jpegtran re-codes it without loss (entropy
  re-coding, -perfect rotation); when a rotation cannot be lossless (partial edge
  blocks) it is decoded, turned and encoded once, marked DERIVED with the history;
- 4:4:4 or RGB-coded JPEG: see IngestSettings.jpeg_444;
- PNG and uncompressed/lossless TIFF: stored losslessly (JPEG-LS lossless);
- HEIC/HEIF and JPEG-compressed TIFF: encoded once as baseline JPEG, both lossy
  steps recorded in LossyImageCompressionMethod/Ratio.

Refused, with a reason: CMYK/YCCK (no faithful DICOM colour model without a
colour-managed conversion the clinician has not seen), more than 8 bits per
sample (VL Photographic holds 8), transparency, multi-page TIFF, arithmetic /
lossless / hierarchical JPEG processes.
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from gateway.core.ingest import limits
from gateway.core.ingest.config import IngestSettings
from gateway.core.ingest.digests import sha256_of
from gateway.core.ingest.errors import CORRUPT, NOT_FAITHFUL, UNSUPPORTED_TYPE, IngestRejected
from gateway.core.ingest.exif import ExifFacts, read_facts, upright, upright_size
from gateway.core.ingest.renditions import Renditions, decode_target, from_image
from gateway.core.ingest.sniff import HEAD_BYTES, sniff
from gateway.core.objects import jpeg
from gateway.core.objects.vlphoto import EncapsulatedJpeg, jpeg_ls_lossless

try:  # HEIC/HEIF support registers itself with Pillow
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a declared dependency
    pass

JPEG_METHOD = "ISO_10918_1"
HEVC_METHOD = "ISO_23008_2"

Closers = list[Callable[[], object]]  # what to release when the prepared file is done with (or refused), in order of creation
# pixels for DICOM, EXIF facts, upright width and height, derived, derivation, renditions
_Derived = tuple[EncapsulatedJpeg, ExifFacts, int, int, bool, str | None, Renditions]


@dataclass
class Prepared:
    path: Path
    sha256: str
    size: int
    kind: str
    media_type: str
    width: int  # upright
    height: int
    facts: ExifFacts
    pixels: EncapsulatedJpeg
    derived: bool
    derivation: str | None
    renditions: Renditions
    _closers: Closers = field(default_factory=list)

    def close(self) -> None:
        """Release files, temp files and decoded pixels (the object is spent afterwards)."""
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                pass
        self._closers.clear()


def _open_image(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Image.open(path)
        except Image.DecompressionBombError as exc:
            raise limits.refuse_unfaithful(str(exc)) from None
        except Exception as exc:
            raise IngestRejected(CORRUPT, f"corrupt or truncated image: {exc}") from None


def _load(image: Image.Image, what: str) -> None:
    try:
        image.load()
    except Exception as exc:
        raise IngestRejected(CORRUPT, f"corrupt or truncated {what}: {exc}") from None


def _ratio(width: int, height: int, samples: int, compressed: int) -> float:
    return (width * height * samples) / max(compressed, 1)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # 4:2:0 so the result is YBR_FULL_422, the form the VL Image IOD requires for JPEG
    image.save(out, "JPEG", quality=quality, subsampling=2 if image.mode == "RGB" else 0, progressive=False)
    return out.getvalue()


def _encapsulate(buf: jpeg.ByteSource, info: jpeg.JpegInfo, lossy: list[tuple[str, float]]) -> EncapsulatedJpeg:
    try:
        pieces = jpeg.clean_pieces(buf, info)
    except jpeg.JpegError as exc:
        raise IngestRejected(CORRUPT, str(exc)) from None
    return EncapsulatedJpeg(
        source=buf, pieces=pieces, width=info.width, height=info.height, samples=len(info.components),
        photometric=info.photometric, lossy=lossy, icc_profile=info.icc_profile,
    )


def _keep_lossless(image: Image.Image, lossy: list[tuple[str, float]], icc: bytes | None,
                   settings: IngestSettings) -> tuple[EncapsulatedJpeg, Renditions]:
    """Decoded pixels kept without loss (JPEG-LS) and the renditions; `image` is closed on the way.

    One decoded image and one sample buffer at a time, and grey renditions are made from
    the samples: a 1-bit 10000 x 10000 PNG peaks ~200 MiB above idle, where stored
    uncompressed it took ~380 MiB and left a 100 MB object (bench/ingest.py "lossless").
    """
    width, height = image.size
    components = 1 if image.mode in ("1", "L") else 3
    samples = _samples(image)
    rends = None if components == 1 else _renditions(image, settings)
    image.close()
    if rends is None:  # the grey samples themselves, shared with Pillow without a copy
        rends = _renditions(Image.frombuffer("L", (width, height), samples, "raw", "L", 0, 1), settings)
    return jpeg_ls_lossless(samples, width, height, components, lossy, icc), rends


_BAND_BYTES = 4 << 20


def _samples(image: Image.Image) -> np.ndarray:
    """8-bit samples (grey, or RGB by pixel) in one array, filled a band of rows at a time.

    Image.tobytes() joins a list of chunks: the samples twice over at its peak (+190 MiB
    at 100 MP grey). A 1-bit image unpacks to 0/255 here, with no 8-bit image in between.
    """
    rawmode = "L" if image.mode in ("1", "L") else "RGB"
    per_row = image.width * len(rawmode)
    out = np.empty(image.height * per_row, np.uint8)
    band = max(1, _BAND_BYTES // per_row)
    for top in range(0, image.height, band):
        bottom = min(top + band, image.height)
        rows = image.crop((0, top, image.width, bottom)).tobytes("raw", rawmode)
        out[top * per_row : bottom * per_row] = np.frombuffer(rows, np.uint8)
    return out


def _swap(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, with `old` closed when it is a different image: one full copy of the pixels alive, not several."""
    if new is not old:
        old.close()
    return new


def _check_opaque(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            raise IngestRejected(
                NOT_FAITHFUL, "image has transparent pixels: DICOM VL Photographic has no alpha channel; flatten it first"
            )
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    return image


def prepare(path: Path, settings: IngestSettings, *, sha256: str | None = None, tmp_dir: Path | None = None) -> Prepared:
    """Check and derive; raises IngestRejected with nothing left behind."""
    size = path.stat().st_size
    limits.check_size(size, settings.max_bytes)
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    sniffed = sniff(head)
    digest = sha256 or sha256_of(path)
    closers: Closers = []
    try:
        if sniffed.kind == "jpeg":
            result = _prepare_jpeg(path, size, settings, closers, tmp_dir)
        else:
            result = _prepare_other(path, sniffed.kind, head, settings, closers)
    except BaseException:
        for closer in reversed(closers):
            try:
                closer()
            except Exception:
                pass
        raise
    pixels, facts, width, height, derived, derivation, rends = result
    return Prepared(
        path=path, sha256=digest, size=size, kind=sniffed.kind, media_type=sniffed.media_type, width=width, height=height,
        facts=facts, pixels=pixels, derived=derived, derivation=derivation, renditions=rends, _closers=closers,
    )


def _map(path: Path, closers: Closers) -> jpeg.ByteSource:
    """The file's bytes when small enough to join for the decoder anyway (one read), else a FileView."""
    if path.stat().st_size <= JOIN_LIMIT:
        return path.read_bytes()
    view = jpeg.FileView(path)
    closers.append(view.close)
    return view


def _prepare_jpeg(path: Path, size: int, settings: IngestSettings, closers: Closers, tmp_dir: Path | None) -> _Derived:
    buf = _map(path, closers)
    try:
        info = jpeg.parse(buf, find_end=False)
    except jpeg.JpegError as exc:
        raise IngestRejected(CORRUPT, str(exc)) from None
    limits.check_pixels(info.width, info.height, settings.max_pixels)
    model = info.colour_model
    if model in ("CMYK", "YCCK"):
        raise IngestRejected(
            NOT_FAITHFUL,
            f"{model} JPEG refused: DICOM VL Photographic images are RGB/YCbCr, and converting print (CMYK) colours "
            "to screen colours would change what the photo shows; export it as an sRGB JPEG",
        )
    if model not in ("GRAY", "YCbCr", "RGB"):
        raise IngestRejected(NOT_FAITHFUL, f"JPEG with {model} refused: not a photographic colour model")
    if info.precision != 8:
        raise IngestRejected(NOT_FAITHFUL, f"{info.precision}-bit JPEG refused: VL Photographic images hold 8 bits per sample")
    if info.sof not in (0xC0, 0xC1, 0xC2):
        raise IngestRejected(UNSUPPORTED_TYPE, f"unsupported JPEG process ({info.process}): use baseline or progressive JPEG")
    _check_sampling(info)
    original = _encapsulate(buf, info, [])  # the whole marker walk: refuses a stream without EOI, sets info.eoi_end

    with _open_image(path) as image:  # lazily: the EXIF facts only, no pixels
        facts = read_facts(image)
    orientation = facts.orientation
    width, height = upright_size(info.width, info.height, orientation)
    lossy = [(JPEG_METHOD, _ratio(info.width, info.height, len(info.components), info.eoi_end))]

    derived, derivation = False, None
    src_buf, src_info = buf, info
    if not info.baseline or orientation != 1:
        try:
            recoded = jpeg.recode_to_temp(path, orientation, tmp_dir)
            closers.append(functools.partial(recoded.unlink, missing_ok=True))
            src_buf = _map(recoded, closers)
            src_info = jpeg.parse(src_buf, find_end=False)  # the walk comes with _encapsulate
            src_info.icc_profile = info.icc_profile  # jpegtran -copy none dropped it; DICOM carries it
            if not src_info.baseline:
                raise jpeg.LosslessNotPossible("jpegtran did not produce a baseline JPEG")
            steps = []
            if info.progressive:
                steps.append("progressive JPEG re-coded as baseline without loss (jpegtran)")
            if orientation != 1:
                steps.append(f"EXIF orientation {orientation} applied without loss (jpegtran -perfect)")
            derivation = "; ".join(steps) or None
        except jpeg.LosslessNotPossible as why:
            # partial edge blocks (or no jpegtran): turn the decoded pixels and encode once
            turned = upright(_decoded_image(original, model, tmp_dir), orientation)
            encoded = _encode_jpeg(turned, settings.encode_quality)
            src_info = jpeg.parse(encoded, find_end=False)
            src_info.icc_profile = info.icc_profile
            steps = ["progressive JPEG decoded"] if info.progressive else ["JPEG decoded"]
            if orientation != 1:
                steps.append(f"EXIF orientation {orientation} applied")
            reason = "image size not a multiple of the JPEG block" if "not perfect" in str(why) else str(why)
            derivation = (
                f"{', '.join(steps)} and encoded once as baseline JPEG, quality {settings.encode_quality} "
                f"(a lossless transform was not possible: {reason})"
            )
            lossy.append((JPEG_METHOD, _ratio(src_info.width, src_info.height, len(src_info.components), len(encoded))))
            rends = _renditions(turned, settings)
            return _encapsulate(encoded, src_info, lossy), facts, width, height, True, derivation, rends
        except jpeg.JpegError as exc:
            raise IngestRejected(CORRUPT, str(exc)) from None

    # exactly what goes into DICOM (after jpegtran when it ran): this is what is checked
    stream = original if src_buf is buf else _encapsulate(src_buf, src_info, [])
    stream.lossy = lossy
    if src_info.colour_model == "GRAY" or src_info.subsampled or settings.jpeg_444 == "wrap":
        # One strict decode at the smallest DCT scale that still gives a full preview proves every
        # scan decodes and feeds both renditions. 12 MP 4:2:0 phone photo, prepare + Part 10 write:
        # 70 ms (best of 18), where Pillow's draft decode, which checked nothing, took 75 ms.
        # bench/ingest.py prints the figure ("full prepare").
        rends = _renditions(preview_source(stream, src_info, settings, tmp_dir), settings)
        return stream, facts, width, height, derived, derivation, rends

    # 4:4:4 YCbCr or RGB-coded: keep the decoded pixels losslessly (see IngestSettings.jpeg_444). The
    # renditions come from a second, reduced decode: cheaper than a full-size RGB image to shrink.
    rends = _renditions(preview_source(stream, src_info, settings, tmp_dir), settings)
    samples = _decode(stream, "RGB", tmp_dir)
    note = f"{src_info.subsampling_label if src_info.colour_model == 'YCbCr' else 'RGB-coded'} JPEG decoded and stored without further loss"
    derivation = f"{derivation}; {note}" if derivation else note
    pixels = jpeg_ls_lossless(samples, src_info.width, src_info.height, 3, lossy, src_info.icc_profile)
    return pixels, facts, width, height, derived, derivation, rends


# Chroma samplings libjpeg-turbo's strict decoder handles (Y's factors; Cb and Cr 1 x 1). Nothing
# else comes out of cameras or phones; anything else is refused rather than stored unchecked.
_SAMPLINGS = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)}


def _check_sampling(info: jpeg.JpegInfo) -> None:
    if len(info.components) == 1:
        return
    (_, h0, v0), *chroma = info.components
    if (h0, v0) not in _SAMPLINGS or any((h, v) != (1, 1) for _, h, v in chroma):
        factors = ",".join(f"{h}x{v}" for _, h, v in info.components)
        raise IngestRejected(
            UNSUPPORTED_TYPE,
            f"unsupported JPEG chroma subsampling ({factors}): re-save the photo as a standard 4:2:0, 4:2:2 or 4:4:4 JPEG",
        )


# A JPEG up to this size is read and joined in memory for simplejpeg, which needs the
# whole stream as one buffer (a 24 MP phone JPEG is ~12 MB). A larger one is walked
# through a FileView and decoded by djpeg from a spool file, which reads it as it
# decodes: the bench's 188 MiB (100 MP) upload peaks 57 MiB above idle that way (56
# before there was a strict check), 213 MiB when simplejpeg read it through a mapping.
JOIN_LIMIT = 32 * 1024 * 1024


def _joined(stream: EncapsulatedJpeg) -> bytes:
    if isinstance(stream.source, bytes):  # one copy, no 1 MiB slices
        whole = memoryview(stream.source)
        return b"".join(p if isinstance(p, bytes) else whole[p[0] : p[1]] for p in stream.pieces)
    return b"".join(stream.chunks())


def _corrupt(report: str) -> IngestRejected:
    return IngestRejected(
        CORRUPT,
        f"corrupt or truncated JPEG: the decoder reports {report.strip()!r}; the file is damaged or incomplete: "
        "send the original file again",
    )


def _decode(stream: EncapsulatedJpeg, colourspace: str, tmp_dir: Path | None,
            target: tuple[int, int] | None = None) -> np.ndarray:
    """Decode with every libjpeg warning fatal, at full size or the smallest DCT scale at least `target`.

    Pillow ignores libjpeg's warnings and fills missing data with grey: a JPEG cut short
    (with an EOI appended) or whose frame header claims more pixels than its scans hold
    would be stored as a clinical photo. Returns rows x columns (x samples) uint8; a
    large stream decoded by djpeg gives RGB where RGBX was asked.
    """
    if stream.length > JOIN_LIMIT and shutil.which("djpeg"):
        pixels = _decode_large(stream, tmp_dir, target)
    else:
        min_width, min_height = target or (0, 0)
        try:
            pixels = simplejpeg.decode_jpeg(_joined(stream), colourspace, min_width=min_width, min_height=min_height,
                                            strict=True)
        except ValueError as exc:
            raise _corrupt(str(exc)) from None
    return pixels.reshape(pixels.shape[:2]) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels


def _decode_large(stream: EncapsulatedJpeg, tmp_dir: Path | None, target: tuple[int, int] | None) -> np.ndarray:
    """djpeg -strict (libjpeg-turbo, as simplejpeg) from a spool file to a spool file, read into one array."""
    eighths = _dct_eighths(stream.width, stream.height, target)
    fd, source = tempfile.mkstemp(prefix="decode-", suffix=".jpg", dir=tmp_dir)
    decoded = Path(f"{source}.pnm")
    try:
        with os.fdopen(fd, "wb") as out:
            out.writelines(stream.chunks())
        proc = subprocess.run(["djpeg", "-strict", "-scale", f"{eighths}/8", "-outfile", str(decoded), source],
                              capture_output=True, timeout=600, check=False)
        report = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0 or report:
            raise _corrupt(report.splitlines()[0] if report else f"djpeg exit status {proc.returncode}")
        return _read_pnm(decoded)
    finally:
        os.unlink(source)
        decoded.unlink(missing_ok=True)


def _dct_eighths(width: int, height: int, target: tuple[int, int] | None) -> int:
    """libjpeg's scale (in eighths) giving at least `target`, as simplejpeg's min_width/min_height pick it."""
    if target:
        for eighths in (1, 2, 4):
            if -(-width * eighths // 8) >= target[0] and -(-height * eighths // 8) >= target[1]:
                return eighths
    return 8


def _read_pnm(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        head = re.match(rb"(P[56])\s+(\d+)\s+(\d+)\s+255\s", f.read(64))
        if head is None:
            raise _corrupt("djpeg wrote no image")
        width, height = int(head.group(2)), int(head.group(3))
        pixels = np.empty((height, width, 3 if head.group(1) == b"P6" else 1), np.uint8)
        f.seek(head.end())
        if f.readinto(pixels.data.cast("B")) != pixels.size:
            raise _corrupt("djpeg wrote a short image")
    return pixels


def _decoded_image(stream: EncapsulatedJpeg, model: str, tmp_dir: Path | None) -> Image.Image:
    """Full-size decode as an L or RGB image (for encoding or keeping the pixels)."""
    return Image.fromarray(_decode(stream, "GRAY" if model == "GRAY" else "RGB", tmp_dir))


def preview_source(stream: EncapsulatedJpeg, info: jpeg.JpegInfo, settings: IngestSettings, tmp_dir: Path | None) -> Image.Image:
    """A reduced decode for the renditions, shared with Pillow without a copy.

    RGBX rather than RGB: Pillow keeps 4 bytes per pixel, so RGBX samples are mapped as
    they are, where RGB ones would be copied (~7 ms at 2016 x 1512).
    """
    target = decode_target(info.width, info.height, settings.preview_size, settings.preview_min_fraction)
    pixels = _decode(stream, "GRAY" if info.colour_model == "GRAY" else "RGBX", tmp_dir, target)
    if pixels.ndim == 2 or pixels.shape[2] == 3:
        return Image.fromarray(pixels)
    height, width = pixels.shape[:2]
    return Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)


def _renditions(image: Image.Image, settings: IngestSettings) -> Renditions:
    return from_image(image, 1, preview=settings.preview_size, thumbnail=settings.thumbnail_size, quality=settings.rendition_quality)


def _prepare_other(path: Path, kind: str, head: bytes, settings: IngestSettings, closers: Closers) -> _Derived:
    if kind == "png":
        header = limits.png_header(head)
        limits.check_pixels(header.width, header.height, settings.max_pixels)
        if head[24] == 16:
            raise IngestRejected(
                NOT_FAITHFUL,
                "16-bit PNG refused: VL Photographic images hold 8 bits per sample and reducing the depth would discard "
                "data; export the photo as an 8-bit PNG or JPEG",
            )
    else:
        header = limits.tiff_or_heif_header(path)
        limits.check_pixels(header.width, header.height, settings.max_pixels)

    image = _open_image(path)
    closers.append(image.close)
    facts = read_facts(image)
    lossy: list[tuple[str, float]] = []
    derivation = None
    if kind == "tiff":
        if getattr(image, "n_frames", 1) > 1:
            raise IngestRejected(NOT_FAITHFUL, "multi-page TIFF refused: send one photo per file")
        bits = image.tag_v2.get(258, (8,)) if hasattr(image, "tag_v2") else (8,)
        bits = bits if isinstance(bits, tuple) else (bits,)
        if any(b > 8 for b in bits):
            # Pillow would quietly drop the low byte of a 48-bit RGB TIFF; refuse instead
            raise IngestRejected(
                NOT_FAITHFUL,
                f"{max(bits)}-bit TIFF refused: VL Photographic images hold 8 bits per sample and reducing the depth "
                "would discard data; export the photo as an 8-bit TIFF or JPEG",
            )
        if image.mode in ("CMYK",):
            raise IngestRejected(NOT_FAITHFUL, "CMYK TIFF refused: export the photo as 8-bit RGB")
        if image.mode not in ("RGB", "L", "RGBA", "P", "1"):
            raise IngestRejected(
                NOT_FAITHFUL, f"TIFF with pixel mode {image.mode} refused: only 8-bit RGB (or grey) TIFF is accepted"
            )
    if kind == "heif":
        bit_depth = image.info.get("bit_depth", 8)
        if image.mode not in ("RGB", "RGBA", "L"):
            raise IngestRejected(NOT_FAITHFUL, f"HEIF with pixel mode {image.mode} refused")
    if kind == "png" and image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        raise IngestRejected(NOT_FAITHFUL, f"PNG with pixel mode {image.mode} refused: only 8-bit colour or grey PNG is accepted")
    icc = image.info.get("icc_profile") or None
    tiff_jpeg = kind == "tiff" and str(image.info.get("compression", "")).lower() in ("jpeg", "tiff_jpeg")
    _load(image, {"png": "PNG", "tiff": "TIFF", "heif": "HEIC/HEIF"}[kind])
    image = _swap(image, _check_opaque(image))
    orientation = facts.orientation
    turned = _swap(image, upright(image, orientation))
    width, height = turned.size
    samples = 1 if turned.mode in ("1", "L") else 3

    if kind == "heif" or tiff_jpeg:
        rends = _renditions(turned, settings)
        source_method = HEVC_METHOD if kind == "heif" else JPEG_METHOD
        lossy.append((source_method, _ratio(width, height, samples, os.path.getsize(path))))
        encoded = _encode_jpeg(turned, settings.encode_quality)
        info = jpeg.parse(encoded, find_end=False)
        lossy.append((JPEG_METHOD, _ratio(width, height, samples, len(encoded))))
        what = "HEIC/HEIF (HEVC)" if kind == "heif" else "JPEG-compressed TIFF"
        depth = f", {bit_depth}-bit reduced to 8-bit" if kind == "heif" and bit_depth > 8 else ""
        derivation = f"decoded from {what}{depth} and encoded once as baseline JPEG, quality {settings.encode_quality}"
        if orientation != 1:
            derivation += f"; EXIF orientation {orientation} applied"
        pixels = _encapsulate(encoded, info, lossy)
        pixels.icc_profile = icc
        return pixels, facts, width, height, True, derivation, rends
    if orientation != 1:
        derivation = f"EXIF orientation {orientation} applied (lossless)"
    pixels, rends = _keep_lossless(turned, lossy, icc, settings)
    return pixels, facts, width, height, False, derivation, rends
