"""De-identification of DICOM files: a rules engine over pydicom, driven by a profile file.

A profile (``dicomflow/extracts/profiles/*.yaml``) maps tags to actions. The default,
``basic``, is the PS3.15 Annex E Basic Application Level Confidentiality Profile
(``annex_e_basic.yaml``, the standard's action codes verbatim) with keyed pseudonyms for the
patient and the accession number. A project adds overrides per tag.

Actions (a profile may also use the standard's codes, resolved per element as below):

- ``keep``: unchanged (a sequence is kept and its items are cleaned);
- ``remove`` (X): the element goes;
- ``empty`` (Z, X/Z): zero length, an empty sequence;
- ``replace`` (D, X/D, Z/D, X/Z/D, C) or ``{replace: VALUE}``: a dummy value of the element's VR;
- ``hash``: a keyed pseudonym; PatientID and PatientName both get the patient's pseudonym;
- ``uid`` (U, X/Z/U*): the UID remapped under 2.25 (same input + project -> same output);
- ``shift``: a date moved back by the patient's offset (DA, DT; a TM is kept).

With ``dateShift``, the dates the standard's "Modified Dates" option marks are shifted rather
than removed. Elements the profile does not name are kept, except UIDs (remapped unless a
well-known ``1.2.840.10008.`` UID) and private tags (removed unless kept). Everything is
derived from HMAC-SHA256 keyed with the project's secret and slug: stable across runs and
workers, different per project.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicomflow.extracts.errors import ProfileError

#: The root of standard (well-known) UIDs, which are not identifying and are never remapped.
DICOM_UID_ROOT = "1.2.840.10008."
WORDS = ("keep", "remove", "empty", "replace", "hash", "uid", "shift")
CODES = ("K", "X", "Z", "D", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*")
#: Dummy values by VR (the `replace` action and the standard's D).
DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMOUS", "DA": "19000101", "DS": "0",
    "DT": "19000101000000", "IS": "0", "LO": "ANONYMOUS", "LT": "ANONYMOUS", "PN": "ANONYMOUS",
    "SH": "ANONYMOUS", "ST": "ANONYMOUS", "TM": "000000", "UC": "ANONYMOUS", "UR": "",
    "UT": "ANONYMOUS", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}
#: Longest value of the string VRs a pseudonym may go into.
MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UC": 64, "LT": 64, "ST": 64, "UT": 64}
PSEUDONYM_CHARS = 20
#: UIDs remembered per de-identifier (a study's own recur in each of its instances).
UID_CACHE_SIZE = 4096
PATIENT_KEYWORDS = ("PatientID", "PatientName")
PROFILES = resources.files("dicomflow.extracts") / "profiles"


@dataclass(frozen=True)
class Rule:
    """An action for a tag: a word of WORDS or a code of CODES, and a value for `replace`."""

    action: str
    value: str | None = None


def _rule(spec: Any, where: str) -> Rule:
    if isinstance(spec, Mapping) and list(spec) == ["replace"]:
        return Rule("replace", str(spec["replace"]))
    if isinstance(spec, str) and (spec in WORDS or spec in CODES):
        return Rule(spec)
    raise ProfileError(f"{where}: unknown action {spec!r} (one of {', '.join(WORDS)}, {{replace: VALUE}}, "
                       f"or a PS3.15 code {', '.join(CODES)})")


_MASK = re.compile(r"^[0-9a-fx]{8}$")


def _tag_key(name: str, where: str) -> int | str:
    """A rule's key: a keyword or 8 hex digits -> the tag; with 'x' wildcards -> the mask string."""
    name = str(name).strip()
    if _MASK.match(name.lower()):
        return name.lower() if "x" in name.lower() else int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise ProfileError(f"{where}: {name!r} is neither a DICOM keyword nor a tag (8 hex digits)")
    return tag


@dataclass(frozen=True)
class Profile:
    """A de-identification profile: rules by tag, masks for repeating groups, and options.

    Attributes:
        name: the profile's name.
        rules: tag -> Rule.
        masks: (mask, Rule) for keys with 'x' wildcards (e.g. ``60xx3000``).
        modified_dates: the tags shifted, rather than removed, when `date_shift` is on.
        date_shift: shift the `modified_dates` (and `shift` rules) by the patient's offset.
        max_shift_days: the largest offset; offsets are 1 .. this many days back.
        keep_private: private tags kept (all other private tags are removed).
    """

    name: str
    rules: dict[int, Rule] = field(default_factory=dict)
    masks: tuple[tuple[str, Rule], ...] = ()
    modified_dates: frozenset[int] = frozenset()
    date_shift: bool = False
    max_shift_days: int = 365
    keep_private: frozenset[int] = frozenset()

    @classmethod
    def load(cls, name_or_path: str | Path, base: Path | None = None, _seen: tuple[str, ...] = ()) -> Profile:
        """A profile by name (a file of dicomflow/extracts/profiles) or path (relative to `base`).

        Raises:
            ProfileError: the file is missing, not YAML, has an unknown key, tag or action, or
                extends itself.
        """
        text, where, folder = cls._read(name_or_path, base)
        if where in _seen:
            raise ProfileError(f"{where}: extends itself ({' -> '.join(_seen)})")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ProfileError(f"{where}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: a profile is a mapping (name:, rules: ...)")
        unknown = set(data) - {"name", "extends", "privateTags", "dateShift", "maxShiftDays", "rules",
                               "modifiedDates", "keepPrivate"}
        if unknown:
            raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
        if data.get("extends"):
            profile = cls.load(data["extends"], folder, (*_seen, where))
        else:
            profile = cls(name=str(data.get("name") or where))
        if data.get("privateTags", "remove") != "remove":
            raise ProfileError(f"{where}: privateTags: only 'remove' is supported (keep tags with keepPrivate)")
        return profile.with_changes(
            name=str(data.get("name") or profile.name),
            rules=data.get("rules") or {},
            modified_dates=data.get("modifiedDates") or (),
            date_shift=data.get("dateShift"),
            max_shift_days=data.get("maxShiftDays"),
            keep_private=data.get("keepPrivate") or (),
            where=where,
        )

    @staticmethod
    def _read(name_or_path: str | Path, base: Path | None) -> tuple[str, str, Path | None]:
        name = str(name_or_path)
        if re.fullmatch(r"[A-Za-z0-9_-]+", name):
            resource = PROFILES / f"{name.replace('-', '_')}.yaml"
            if resource.is_file():
                return resource.read_text(encoding="utf-8"), f"profile {name}", None
        path = Path(name)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            return path.read_text(encoding="utf-8"), str(path), path.parent
        except OSError as exc:
            raise ProfileError(f"no profile {name!r} (no such file {path}, and not one of "
                               f"{sorted(p.name.removesuffix('.yaml') for p in PROFILES.iterdir())})") from exc

    def with_changes(self, *, name: str | None = None, rules: Mapping[str, Any] | None = None,
                     modified_dates: Iterable[str] = (), date_shift: bool | None = None,
                     max_shift_days: int | None = None, keep_private: Iterable[str] = (),
                     where: str = "overrides") -> Profile:
        """This profile with more rules (later ones win) and options; used for `extends` and projects."""
        new_rules = dict(self.rules)
        masks = dict(self.masks)
        for key, spec in (rules or {}).items():
            tag = _tag_key(key, f"{where} [rules.{key}]")
            rule = _rule(spec, f"{where} [rules.{key}]")
            if isinstance(tag, str):
                masks[tag] = rule
            else:
                new_rules[tag] = rule
        dates = set(self.modified_dates)
        for key in modified_dates:
            tag = _tag_key(key, f"{where} [modifiedDates]")
            if isinstance(tag, int):
                dates.add(tag)
        kept = set(self.keep_private)
        for key in keep_private:
            tag = _tag_key(key, f"{where} [keepPrivate]")
            if not isinstance(tag, int) or not (tag >> 16) % 2:
                raise ProfileError(f"{where} [keepPrivate]: {key!r} is not a private tag")
            kept.add(tag)
        if max_shift_days is not None and (not isinstance(max_shift_days, int) or max_shift_days < 1):
            raise ProfileError(f"{where} [maxShiftDays]: a whole number of days, at least 1")
        return replace(
            self, name=name or self.name, rules=new_rules, masks=tuple(masks.items()),
            modified_dates=frozenset(dates),
            date_shift=self.date_shift if date_shift is None else bool(date_shift),
            max_shift_days=self.max_shift_days if max_shift_days is None else max_shift_days,
            keep_private=frozenset(kept),
        )

    def rule_for(self, tag: int) -> Rule | None:
        """The rule of a (non-private) tag, or None when the profile does not name it."""
        rule = self.rules.get(tag)
        if rule is None and self.masks:
            hex_tag = f"{tag:08x}"
            for mask, mask_rule in self.masks:
                if all(m == "x" or m == h for m, h in zip(mask, hex_tag)):
                    return mask_rule
        return rule


class Deidentifier:
    """Applies a profile with one project's keys.

    Args:
        profile: the rules.
        secret: the project's pseudonym secret.
        project: the project's slug (mixed into every key, so two projects never share output).
    """

    def __init__(self, profile: Profile, secret: bytes, project: str):
        if not secret:
            raise ProfileError("an empty pseudonym secret")
        self.profile = profile
        self.project = project
        self._key = hmac.new(secret, b"dicomflow-deid\0" + project.encode(), hashlib.sha256).digest()
        # keyed once; each digest copies it (cheaper than hmac.new's key set-up per value)
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)
        # the study's, series' and frame of reference's UIDs recur in every instance
        self._uids_seen: dict[str, str] = {}

    @classmethod
    def for_project(cls, project: Any, environ: Mapping[str, str] | None = None) -> Deidentifier:
        """The de-identifier of a `dicomflow.extracts.project.Project` (its profile, overrides, secret).

        Raises:
            ProfileError: the profile or an override is broken.
            SecretError: the secret cannot be read.
        """
        deid = project.model.deid
        profile = Profile.load(deid.profile, project.source.parent).with_changes(
            rules=deid.overrides, date_shift=deid.date_shift, keep_private=deid.keep_private,
            where=f"{project.source} [deid]")
        return cls(profile, project.secret(environ), project.slug)

    # -- keyed values ---------------------------------------------------------------------
    def _digest(self, kind: str, value: str) -> bytes:
        mac = self._mac.copy()
        mac.update(f"{kind}\0{value}".encode())
        return mac.digest()

    def pseudonym(self, kind: str, value: str, length: int = PSEUDONYM_CHARS) -> str:
        """A keyed pseudonym of `value` (upper-case hex); '' stays ''."""
        if not value:
            return ""
        return self._digest(kind, value).hex().upper()[:length]

    def patient_pseudonym(self, patient_id: str) -> str:
        """The pseudonym of a patient (PatientID and PatientName both become it)."""
        return self.pseudonym("patient", patient_id.strip())

    def uid(self, uid: str) -> str:
        """The UID that replaces `uid` in this project: 2.25 + a UUID (RFC 9562 version 8) from its HMAC."""
        uid = uid.strip().rstrip("\0")
        if not uid or uid.startswith(DICOM_UID_ROOT):
            return uid
        known = self._uids_seen.get(uid)
        if known is not None:
            return known
        raw = bytearray(self._digest("uid", uid)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80   # version 8 (custom)
        raw[8] = (raw[8] & 0x3F) | 0x80   # RFC 4122/9562 variant
        if len(self._uids_seen) >= UID_CACHE_SIZE:
            self._uids_seen.clear()
        new = self._uids_seen[uid] = f"2.25.{int.from_bytes(raw, 'big')}"
        return new

    def date_offset(self, patient_id: str) -> dt.timedelta:
        """The patient's date shift: 1 .. max_shift_days days back, from the HMAC of their PatientID."""
        days = int.from_bytes(self._digest("dateshift", patient_id.strip())[:8], "big")
        return dt.timedelta(days=-(1 + days % self.profile.max_shift_days))

    # -- datasets -------------------------------------------------------------------------
    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place and return it (file meta rebuilt, preamble zeroed)."""
        patient_id = str(ds.get("PatientID", "") or "")
        context = _Context(self.patient_pseudonym(patient_id) if patient_id else "",
                           self.date_offset(patient_id))
        self._clean(ds, context)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"dicomflow {self.profile.name} (PS3.15 E.1), project {self.project}"[:64]
        codes = [("113100", "Basic Application Confidentiality Profile")]
        if self.profile.date_shift:
            codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethodCodeSequence = Sequence(
            [_code(value, meaning) for value, meaning in codes])
        meta = getattr(ds, "file_meta", None)
        if meta is not None:   # rebuilt: the sender's AE title and implementation go
            new_meta = FileMetaDataset()
            for keyword, value in (("MediaStorageSOPClassUID", ds.get("SOPClassUID")),
                                   ("MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID")),
                                   ("TransferSyntaxUID", meta.get("TransferSyntaxUID"))):
                if value:
                    setattr(new_meta, keyword, value)
            new_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            new_meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
            ds.file_meta = new_meta
        if hasattr(ds, "preamble"):
            ds.preamble = b"\0" * 128
        return ds

    def file(self, source: str | Path, target: str | Path) -> Path:
        """De-identify the DICOM file `source` into `target` (the source is not modified)."""
        ds = pydicom.dcmread(source)
        self.dataset(ds)
        target = Path(target)
        # a conformant file (preamble, meta) whenever the dataset can make one
        ds.save_as(target, enforce_file_format="SOPClassUID" in ds and "SOPInstanceUID" in ds)
        return target

    def _clean(self, ds: Dataset, ctx: _Context) -> None:
        profile = self.profile
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if tag.is_private:
                if tag in profile.keep_private:
                    continue
                if tag.element < 0x0100 and tag.element >= 0x0010:   # private creator of a kept block?
                    block = (tag.group << 16) | (tag.element << 8)
                    if any(block <= k < block + 0x100 for k in profile.keep_private):
                        continue
                del ds[tag]
                continue
            if tag.group == 0x0002:
                continue
            # The element as read (pydicom converts raw bytes to a value only when asked): an
            # element that stays as it is is never converted, and pydicom writes its bytes back
            # as they came. That is most of them, and converting them was half of the time.
            vr = ds.get_item(tag).VR
            if vr is None or vr == "UN":   # implicit VR or unknown: let pydicom work it out
                vr = ds[tag].VR
            rule = profile.rule_for(tag)
            if rule is None:
                if vr == "SQ":
                    self._items(ds[tag], ctx)
                elif vr == "UI":
                    elem = ds[tag]
                    self._set(ds, elem, self._uids(elem.value))
                continue
            action = self._action(rule, tag, vr)
            if action == "remove":
                del ds[tag]
            elif action != "keep" or vr == "SQ":
                self._apply(ds, ds[tag], action, rule, ctx)

    def _items(self, elem: DataElement, ctx: _Context) -> None:
        for item in elem.value or ():
            self._clean(item, ctx)

    def _apply(self, ds: Dataset, elem: DataElement, action: str, rule: Rule, ctx: _Context) -> None:
        if action == "keep":
            if elem.VR == "SQ":
                self._items(elem, ctx)
        elif action == "remove":
            del ds[elem.tag]
        elif action == "empty":
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif action == "uid":
            self._set(ds, elem, self._uids(elem.value) if elem.VR == "UI" else None)
        elif action == "shift":
            self._set(ds, elem, self._shift(elem, ctx))
        elif action == "hash":
            self._set(ds, elem, self._hash(elem, ctx))
        else:  # replace
            self._set(ds, elem, rule.value if rule.value is not None else _dummy(elem))

    def _action(self, rule: Rule, tag: int, vr: str) -> str:
        """A rule's action for an element (its tag and VR): a word as it is, a PS3.15 code resolved
        by VR and options."""
        code = rule.action
        if code in WORDS:
            return code
        if code == "K":
            return "keep"
        if self.profile.date_shift and tag in self.profile.modified_dates and vr in ("DA", "DT", "TM"):
            return "shift"
        if "U" in code and vr == "UI":
            return "uid"
        if code == "X":
            return "remove"
        if "Z" in code and (code != "Z/D" or vr == "SQ"):
            return "empty"   # X/Z and X/Z/D: zero length keeps a type 2 attribute present
        if vr == "UI":
            return "uid"
        return "replace" if vr != "SQ" else "empty"

    def _set(self, ds: Dataset, elem: DataElement, value: Any) -> None:
        if value is None or value == "":
            elem.value = Sequence() if elem.VR == "SQ" else None
        else:
            elem.value = value

    def _uids(self, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            return [self.uid(str(v)) for v in value]
        return self.uid(str(value))

    def _hash(self, elem: DataElement, ctx: _Context) -> Any:
        if elem.VR == "SQ" or elem.value in (None, ""):
            return None
        if keyword_for_tag(elem.tag) in PATIENT_KEYWORDS:
            return ctx.patient
        if elem.VR == "UI":
            return self._uids(elem.value)
        length = min(PSEUDONYM_CHARS, MAX_LEN.get(elem.VR, PSEUDONYM_CHARS))
        return self.pseudonym(f"{elem.tag:08x}", str(elem.value), length)

    def _shift(self, elem: DataElement, ctx: _Context) -> Any:
        if elem.VR == "TM" or elem.value in (None, ""):
            return elem.value   # a shift by whole days leaves times as they are
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        shifted = [_shift_date(str(v), ctx.offset) for v in values]
        if any(s is None for s in shifted):
            return None   # a date we cannot read is removed, never passed through
        return shifted if len(shifted) > 1 else shifted[0]


@dataclass(frozen=True)
class _Context:
    """What one dataset's rules need: its patient's pseudonym and date offset."""

    patient: str
    offset: dt.timedelta


def _shift_date(value: str, offset: dt.timedelta) -> str | None:
    """A DA (YYYYMMDD) or DT (YYYYMMDD...) value shifted by `offset`; None if unreadable."""
    value = value.strip()
    if len(value) < 8 or not value[:8].isdigit():
        return None
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None
    return (day + offset).strftime("%Y%m%d") + value[8:]


def _dummy(elem: DataElement) -> Any:
    if elem.VR == "UI":
        return None
    return DUMMY.get(elem.VR)   # None for binary VRs (OB, OW, UN...): emptied


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
