"""DICOM objects as senders make them, for the received-object tests: dcmtk's img2dcm and pydicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from tests.conftest import require_tool

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
NHS_NUMBER = "9449305552"  # tests.ingest_helpers.add_patient's default


def img2dcm(jpeg: Path, out: Path, *options: str, **keys: str) -> Path:
    """dcmtk wraps the JPEG without decoding it: `img2dcm -vlp [options] -k Key=value ... jpeg out`."""
    tool = require_tool("img2dcm", "dcmtk")
    args = [tool, "-vlp", *options]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    subprocess.run(args + [str(jpeg), str(out)], check=True, capture_output=True, timeout=60)
    return out


def gradient(rows: int, columns: int, samples: int = 3) -> np.ndarray:
    """A smooth picture with a bright red square in the middle (colour order is checked against it)."""
    y, x = np.mgrid[0:rows, 0:columns]
    if samples == 1:
        return ((x * 255 // max(columns - 1, 1) + y * 64 // max(rows - 1, 1)) % 256).astype(np.uint8)
    pixels = np.stack([x * 200 // max(columns - 1, 1), y * 200 // max(rows - 1, 1), np.full_like(x, 60)], axis=2).astype(np.uint8)
    pixels[rows // 3 : 2 * rows // 3, columns // 3 : 2 * columns // 3] = (250, 10, 10)
    return pixels


def dataset(sop_class: str = VL_PHOTO, *, patient_id: str = NHS_NUMBER, issuer: str | None = "NHS",
            name: str = "SENDER^AS^SENT", rows: int = 240, columns: int = 320, samples: int = 3,
            photometric: str = "RGB") -> Dataset:
    """A data set of the class with the modules its IOD requires (no Pixel Data yet)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = name
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20240305", "142231"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 3
    ds.Manufacturer = "Acme"
    ds.ManufacturerModelName = "DermCam 2"
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = "20240305", "142231"
    ds.TimezoneOffsetFromUTC = "+0000"
    if sop_class in (VL_PHOTO, DERMOSCOPY):
        ds.Modality = "XC" if sop_class == VL_PHOTO else "DMS"
        ds.Laterality = "R"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionContextSequence = []
        ds.LossyImageCompression = "00"
    else:
        ds.Modality = "OT"
        ds.ConversionType = "DI"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def native(path: Path, pixels: np.ndarray, transfer_syntax: str = ExplicitVRLittleEndian, **kw) -> Path:
    samples = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds = dataset(rows=pixels.shape[0], columns=pixels.shape[1], samples=samples,
                 photometric=kw.pop("photometric", "MONOCHROME2" if samples == 1 else "RGB"), **kw)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return write(ds, path, transfer_syntax)


def compressed(path: Path, pixels: np.ndarray, transfer_syntax: str, **kw) -> Path:
    """JPEG-LS Lossless or RLE Lossless, encoded by pydicom (pyjpegls, its own RLE encoder)."""
    samples = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds = dataset(rows=pixels.shape[0], columns=pixels.shape[1], samples=samples,
                 photometric="MONOCHROME2" if samples == 1 else "RGB", **kw)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds.compress(transfer_syntax, pixels)
    return write(ds, path, transfer_syntax)


def jpeg_wrapped(path: Path, jpeg: bytes, width: int, height: int, *, sop_class: str = VL_PHOTO, **kw) -> Path:
    """A baseline 4:2:0 JPEG encapsulated as it is (YBR_FULL_422), as a camera's DICOM export does."""
    ds = dataset(sop_class, rows=height, columns=width, photometric="YBR_FULL_422", **kw)
    if sop_class != SECONDARY_CAPTURE:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = "10"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return write(ds, path, JPEGBaseline8Bit)


def with_file_meta(src: Path, out: Path, **meta: str) -> Path:
    """The same data set under other file meta (another sender relaying it)."""
    ds = dcmread(src)
    for key, value in meta.items():
        setattr(ds.file_meta, key, value)
    dcmwrite(out, ds, enforce_file_format=True)
    return out


__all__ = ["ImplicitVRLittleEndian", "compressed", "dataset", "gradient", "img2dcm", "jpeg_wrapped", "native", "write"]
