"""Bulk import of a legacy archive: a folder of photos plus a CSV manifest, through the same pipeline.

Manifest columns (header row; only `file` and `patient` are required):

    file, patient, encounter, bodySite, laterality, bodySiteDisplay, view, specialty, sensitivity,
    consentId, consentLevel, consentGivenBy, consentCapturedBy, consentDate, consentPurpose,
    photographer, device, takenAt, description, session

`file` is relative to DIR (paths leaving DIR are refused). Photos of one patient
and encounter in one manifest form one series (or name a `session`).

A consent given in a row is recorded by the one consent writer with the row's photo
(the same rules and audit record as the consent API: publication needs consentPurpose).

Resumable: every stored row is appended to a state file (JSON lines, fsynced), and
a re-run skips those rows; anything refused is tried again. Content already stored
for the patient is reported as existing, never stored twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.context import Gateway
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest, uncovered
from gateway.core.ingest.request import CaptureRequest, ImageFile, Source

REQUIRED = ("file", "patient")
KNOWN = (
    "file", "patient", "encounter", "bodySite", "laterality", "bodySiteDisplay", "view", "specialty", "sensitivity",
    "consentId", "consentLevel", "consentGivenBy", "consentCapturedBy", "consentDate", "consentPurpose", "photographer",
    "device", "takenAt", "description", "session",
)


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing file, missing columns, unknown columns), or the resume file."""


@dataclass
class Row:
    number: int  # 1-based data row number (header excluded)
    values: dict[str, str]
    problem: str | None = None  # why this row cannot be read as the header says: that row's rejection

    @property
    def key(self) -> str:
        return f"{self.number}:{self.values.get('file', '')}"


@dataclass
class ImportSummary:
    total: int = 0
    imported: int = 0
    existing: int = 0
    rejected: int = 0
    resumed: int = 0  # skipped: stored by an earlier run
    seconds: float = 0.0
    rejected_csv: Path | None = None
    rejections: list[tuple[Row, str, str]] = field(default_factory=list)  # (row, code, message)
    uncovered: int = 0  # stored, but no consent covers them for care: hidden until one is recorded
    warnings_csv: Path | None = None
    warnings: list[tuple[Row, str, str]] = field(default_factory=list)  # (row, code, message) of stored rows
    notes: list[str] = field(default_factory=list)  # for the operator: a report written elsewhere than asked


def read_manifest(path: Path) -> list[Row]:
    if not path.is_file():  # a folder or a pipe was "not found" too, which sent the operator looking for a file
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise ManifestError(f"manifest {what}: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # a spreadsheet's "CSV" (Windows-1252) or "Unicode text" (UTF-16) save: a traceback before, and guessing
        # the encoding could put wrong letters into patient records
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(f"manifest {path.name} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                            "save it as CSV UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(f"manifest {path.name} lacks column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})")
        # a column named twice: the last one silently won (a second 'file' column chose which photo was stored)
        twice = sorted({c for c in header if c and header.count(c) > 1})
        if twice:
            raise ManifestError(f"manifest {path.name} names column(s) {', '.join(twice)} more than once")
        unknown = [c for c in header if c and c not in KNOWN]
        if unknown:
            raise ManifestError(f"manifest {path.name} has unknown column(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
        rows = []
        for number, cells in enumerate(reader, start=1):
            values: dict[str, str] = {}
            problem = None
            for index, cell in enumerate(cells):
                name = header[index] if index < len(header) else ""
                if name:
                    values[name] = cell.strip()
                elif cell.strip() and problem is None:
                    # the blank columns a spreadsheet leaves are fine while they stay empty; a value there (an
                    # unquoted comma shifting the row) was dropped without a word: now that row is refused
                    problem = f"a value in column {index + 1}, which has no name in the header (an unquoted comma?)"
            if any(values.values()) or problem:
                rows.append(Row(number, values, problem))
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit: a traceback before
        raise ManifestError(f"manifest {path.name} line {reader.line_num}: {exc}") from None
    return rows


def row_metadata(row: Row) -> dict[str, Any]:
    v = row.values
    meta: dict[str, Any] = {"patient": v.get("patient", "")}
    for column, key in (("encounter", "encounter"), ("view", "view"), ("specialty", "specialty"), ("sensitivity", "sensitivity"),
                        ("consentId", "consentId"), ("photographer", "photographer"), ("device", "device"),
                        ("takenAt", "takenAt"), ("description", "description")):
        if v.get(column):
            meta[key] = v[column]
    if v.get("bodySite"):
        site = {"code": v["bodySite"]}
        if v.get("laterality"):
            site["laterality"] = v["laterality"]
        if v.get("bodySiteDisplay"):
            site["display"] = v["bodySiteDisplay"]
        meta["bodySite"] = site
    if v.get("consentLevel") or v.get("consentGivenBy"):
        consent = {"level": v.get("consentLevel", ""), "givenBy": v.get("consentGivenBy", "")}
        if v.get("consentCapturedBy"):
            consent["capturedBy"] = v["consentCapturedBy"]
        if v.get("consentDate"):
            consent["date"] = v["consentDate"]
        if v.get("consentPurpose"):
            consent["purpose"] = v["consentPurpose"]
        meta["consent"] = consent
    return meta


class StateFile:
    """Rows already stored, one JSON line each; appended and fsynced after every commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        self._lock = threading.Lock()
        # --state naming a folder, another file, or a place that cannot be written: a traceback before (and a
        # JSON line that is not an object a TypeError); now one line before anything is imported
        try:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            path.parent.mkdir(parents=True, exist_ok=True)
        except UnicodeDecodeError:
            raise ManifestError(f"resume file {path} is not one an import wrote (not UTF-8 text); name another with --state") from None
        except OSError as exc:
            raise ManifestError(f"cannot use resume file {path}: {exc.strerror or exc}") from None
        lines = text.splitlines()
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
                self.done.add(record["row"])
            except (ValueError, KeyError, TypeError):
                # only a crash's torn last line may be unreadable; a first line that is a finished line but not a
                # record is another file (--state naming the manifest had these lines appended to it)
                if number == 0 and (len(lines) > 1 or text.endswith("\n")):
                    raise ManifestError(f"resume file {path} is not one an import wrote (its first line is not a "
                                        "record); name another with --state") from None
                continue  # a torn last line from a crash: that row is simply tried again

    def record(self, row: Row, asset_ids: list[str], status: str) -> None:
        line = json.dumps({"row": row.key, "assets": asset_ids, "status": status}) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self.done.add(row.key)


def default_state_path(data_dir: Path, folder: Path, manifest: Path) -> Path:
    ident = hashlib.sha256(f"{folder.resolve()}|{manifest.resolve()}".encode()).hexdigest()[:16]
    return data_dir / "imports" / f"{manifest.stem}-{ident}.jsonl"


def _inside(folder: Path, relative: str) -> Path | None:
    """The row's file, if it lies inside the import folder (symbolic links followed); None if not. A name that cannot
    be resolved (a NUL byte in it, a link that points at itself) is that row's rejection: Path.resolve's ValueError
    or RuntimeError stopped the whole import there, and a resumed import at the same row again."""
    if "\x00" in relative:
        raise IngestRejected("bad-manifest", "the 'file' column holds a NUL byte")
    try:
        candidate = (folder / relative).resolve()
    except (RuntimeError, OSError) as exc:  # a loop: RuntimeError (Python 3.11), OSError ELOOP (3.13)
        raise IngestRejected("missing-file", f"{relative!r} cannot be followed to a file: a symbolic link loop? "
                             f"({type(exc).__name__})") from None
    try:
        candidate.relative_to(folder.resolve())
    except ValueError:
        return None
    return candidate


def run_import(
    gw: Gateway,
    folder: Path,
    manifest: Path,
    source: Source,
    *,
    state_path: Path | None = None,
    rejected_csv: Path | None = None,
    on_progress: Callable[[Row, str], None] | None = None,
    workers: int = 1,
) -> ImportSummary:
    started = time.monotonic()
    rows = read_manifest(manifest)
    state = StateFile(state_path or default_state_path(gw.settings.data_dir, folder, manifest))
    summary = ImportSummary(total=len(rows))
    todo = []
    for row in rows:
        if row.key in state.done:
            summary.resumed += 1
            if on_progress:
                on_progress(row, "resumed")
        else:
            todo.append(row)
    lock = threading.Lock()

    def one(row: Row) -> str:
        return _import_row(gw, folder, manifest, row, source, state, summary, lock)

    if workers <= 1:
        for row in todo:
            outcome = one(row)
            if on_progress:
                on_progress(row, outcome)
    else:
        # photos are independent; the store serialises the commits. Bounded in flight, so a
        # Ctrl-C stops after the rows already started and nothing else is queued.
        pool = ThreadPoolExecutor(workers, thread_name_prefix="import")
        pending: dict[Future[str], Row] = {}
        queue = iter(todo)
        try:
            for row in queue:
                pending[pool.submit(one, row)] = row
                if len(pending) >= workers * 2:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        outcome = future.result()
                        if on_progress:
                            on_progress(pending.pop(future), outcome)
            for future in list(pending):
                outcome = future.result()
                if on_progress:
                    on_progress(pending.pop(future), outcome)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.monotonic() - started
    if summary.rejections:
        summary.rejections.sort(key=lambda r: r[0].number)
        target = rejected_csv or manifest.with_name(f"{manifest.stem}.rejected.csv")
        summary.rejected_csv = _write_report(target, state.path.with_suffix(".rejected.csv"), summary.rejections, summary)
    if summary.warnings:
        summary.warnings.sort(key=lambda r: r[0].number)
        target = manifest.with_name(f"{manifest.stem}.warnings.csv")
        summary.warnings_csv = _write_report(target, state.path.with_suffix(".warnings.csv"), summary.warnings, summary)
    return summary


def _write_report(target: Path, fallback: Path, rows: list[tuple[Row, str, str]], summary: ImportSummary) -> Path | None:
    """Write a report CSV; where it cannot be written (a manifest on a read-only share, --rejected naming a folder),
    write it beside the resume file and say so. That was a traceback after every row had been imported: the
    summary and the list of refused rows were lost."""
    try:
        write_rejected(target, rows)
        return target
    except OSError as exc:
        problem = f"cannot write {target}: {exc.strerror or exc}"
    try:
        write_rejected(fallback, rows)
    except OSError as exc:
        summary.notes.append(f"{problem}; nor {fallback}: {exc.strerror or exc}")
        return None
    summary.notes.append(f"{problem}; written to {fallback} instead")
    return fallback


def _import_row(gw: Gateway, folder: Path, manifest: Path, row: Row, source: Source, state: StateFile,
                summary: ImportSummary, lock: threading.Lock) -> str:
    relative = row.values.get("file", "")
    try:
        if row.problem:
            raise IngestRejected("bad-manifest", row.problem)
        if not relative:
            raise IngestRejected("bad-manifest", "empty 'file' column")
        path = _inside(folder, relative)
        if path is None:
            raise IngestRejected("bad-manifest", f"{relative!r} is outside the import folder")
        try:
            found = path.is_file()
        except OSError as exc:  # a name over the filesystem's limit (ENAMETOOLONG) stopped the whole import here
            raise IngestRejected("missing-file", f"{relative!r} cannot be looked up: {exc.strerror}") from None
        if not found:
            raise IngestRejected("missing-file", f"no such file: {relative}")
        meta = parse_metadata(row_metadata(row))
        session = row.values.get("session") or f"import|{manifest.name}|{meta.patient}|{meta.encounter or ''}"
        result = ingest(gw, CaptureRequest(
            source=source, items=[ImageFile(path, filename=relative, instance_number=row.number)],
            patient=meta.patient_ref(), governance=meta.governance(), session_key=session))
    except IngestRejected as exc:
        with lock:
            summary.rejected += 1
            summary.rejections.append((row, exc.code, exc.message))
        return "rejected"
    status = result.photos[0].status
    state.record(row, [p.asset_id for p in result.photos], status)
    hidden = uncovered(gw, result)  # as the upload API warns: stored, but nobody sees it for care yet
    with lock:
        if status == "created":
            summary.imported += 1
        else:
            summary.existing += 1
        if hidden:
            summary.uncovered += 1
            summary.warnings.append((row, "no-consent", "stored, but no consent covers it for care: it stays hidden "
                                                        "until a consent is recorded (consent columns, or the consent API)"))
    return status


def write_rejected(path: Path, rejections: list[tuple[Row, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "file", "patient", "code", "reason"])
        for row, code, message in rejections:
            writer.writerow([row.number, row.values.get("file", ""), row.values.get("patient", ""), code, message])


def iter_rows(path: Path) -> Iterator[Row]:
    yield from read_manifest(path)
