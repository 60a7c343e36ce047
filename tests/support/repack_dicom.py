"""Generating small DICOM instances with chosen (missing, empty, odd) tag values for the repack tests."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: Tag values of a plain instance; a test overrides some (None: leave the element out).
BASE: dict[str, str] = {
    "PatientID": "PAT001",
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19800102",
    "PatientSex": "F",
    "PatientAge": "044Y",
    "StudyDate": "20240301",
    "SeriesDate": "20240301",
    "AccessionNumber": "ACC123",
    "Modality": "MR",
    "StudyDescription": "Brain MRI",
    "SeriesDescription": "T1 AX",
    "SeriesNumber": "3",
    "InstanceNumber": "1",
    "PerformedStationAETitle": "SCANNER1",
}


def make_instance(path: Path, *, transfer_syntax: str = ExplicitVRLittleEndian, charset: str | None = None,
                  study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
                  undefined_length_sequence: bool = True, raw: dict[str, bytes] | None = None,
                  drop: tuple[str, ...] = (),
                  **tags: str | None) -> Path:
    """Write an MR instance to `path`; `tags` override `BASE` (None: absent, "": empty).

    `raw` sets elements to raw bytes (e.g. embedded NULs), by keyword; `drop` removes elements
    (e.g. a UID). A sequence precedes the
    patient module (undefined length unless told), so readers must skip it.
    """
    values = {**BASE, **tags}
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedStudySequence = Sequence([ref])
    if undefined_length_sequence:
        ds["ReferencedStudySequence"].is_undefined_length = True
        ref.is_undefined_length_sequence_item = True
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    for keyword, data in (raw or {}).items():
        setattr(ds, keyword, "x")
        # A person name as bytes is written as given (pydicom drops a trailing "=" from a str).
        ds[keyword].value = data if ds[keyword].VR == "PN" else data.decode("latin_1")
    for keyword in drop:
        del ds[keyword]
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    if UID(transfer_syntax).is_compressed and not UID(transfer_syntax).is_deflated:
        ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = bytes(range(32))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.preamble = b"\0" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
