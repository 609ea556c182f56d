"""`clinphoto import DIR --manifest`: legacy archive import, resumable, with a rejected-rows CSV."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from gateway.core.ingest.importer import ManifestError, read_manifest, run_import
from gateway.core.ingest.request import Source
from store.models import Asset, AuditEvent, Consent
from tests.ingest_helpers import add_patient, photo_fixtures

REPO = Path(__file__).resolve().parent.parent
ACTOR = Source.importer("cli:tester")



pytestmark = pytest.mark.usefixtures("validate_stored_dicom")


@pytest.fixture
def archive(tmp_path):
    folder = tmp_path / "archive"
    fx = photo_fixtures.make_all(folder / "photos")
    return folder, fx


def write_manifest(path: Path, rows: list[dict]) -> Path:
    columns = sorted({k for r in rows for k in r}, key=lambda c: ["file", "patient"].index(c) if c in ("file", "patient") else 2)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def standard_rows(patient):
    good = ["baseline_420.jpg", "progressive.jpg", "rgb.png", "photo.heic", "orient_3.jpg"]
    rows = [{"file": f"photos/{n}", "patient": f"nhs|{patient['nhs']}", "encounter": patient["visit"], "bodySite": "85562004",
             "laterality": "left", "sensitivity": "N"} for n in good]
    rows += [
        {"file": "photos/truncated.jpg", "patient": f"nhs|{patient['nhs']}"},
        {"file": "photos/html.jpg", "patient": f"nhs|{patient['nhs']}"},
        {"file": "photos/baseline_422.jpg", "patient": "nhs|9999999999"},
        {"file": "photos/missing.jpg", "patient": f"nhs|{patient['nhs']}"},
        {"file": "../../etc/passwd", "patient": f"nhs|{patient['nhs']}"},
        {"file": "photos/gray.jpg", "patient": f"nhs|{patient['nhs']}", "sensitivity": "Z"},
    ]
    return rows


def count_assets(gw) -> int:
    with gw.db.read() as s:
        return s.scalar(select(func.count()).select_from(Asset))


def test_import_summary_rejected_csv_and_resume(gw, archive, tmp_path):
    folder, _ = archive
    patient = add_patient(gw)
    manifest = write_manifest(folder / "manifest.csv", standard_rows(patient))
    seen = []

    def stop_after_two(row, outcome):
        seen.append(outcome)
        if len(seen) == 2:
            raise KeyboardInterrupt  # the operator pressed Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        run_import(gw, folder, manifest, ACTOR, on_progress=stop_after_two)
    assert count_assets(gw) == 2

    summary = run_import(gw, folder, manifest, ACTOR)
    assert (summary.total, summary.resumed, summary.imported, summary.rejected) == (11, 2, 3, 6)
    assert count_assets(gw) == 5
    with open(summary.rejected_csv, newline="") as f:
        rejected = {r["file"]: r for r in csv.DictReader(f)}
    assert rejected["photos/truncated.jpg"]["code"] == "corrupt"
    assert rejected["photos/html.jpg"]["code"] == "unsupported-type"
    assert rejected["photos/baseline_422.jpg"]["code"] == "unknown-patient" and "9999999999" in rejected["photos/baseline_422.jpg"]["reason"]
    assert rejected["photos/missing.jpg"]["code"] == "missing-file"
    assert "outside the import folder" in rejected["../../etc/passwd"]["reason"]
    assert "sensitivity" in rejected["photos/gray.jpg"]["reason"]

    with gw.db.read() as s:
        assets = s.execute(select(Asset)).scalars().all()
        assert {a.source for a in assets} == {"import"}
        assert len({a.series_uid for a in assets}) == 1  # one series per patient+encounter in a manifest
        assert sorted(a.instance_number for a in assets) == [1, 2, 3, 4, 5]
        assert {a.laterality for a in assets} == {"left"}
        imports = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.type_code == "110107", AuditEvent.outcome == "0"))
        assert imports == 5

    again = run_import(gw, folder, manifest, ACTOR)
    assert again.resumed == 5 and again.imported == 0 and count_assets(gw) == 5


def test_file_names_the_filesystem_cannot_follow_are_rejected_rows_not_the_end_of_the_import(gw, archive):
    """A link pointing at itself, a name over the filesystem's 255 bytes and a NUL byte in the file column each stopped
    the import with a traceback (Path.resolve's RuntimeError and ValueError, is_file's ENAMETOOLONG), and a resumed
    import stopped at the same row again: now each is that row's rejection and the rows after it go in."""
    folder, _ = archive
    patient = add_patient(gw)
    (folder / "photos" / "loop.jpg").symlink_to(folder / "photos" / "loop.jpg")
    base = {"patient": f"nhs|{patient['nhs']}"}
    odd = ["photos/loop.jpg", "photos/" + "a" * 300 + ".jpg", "photos/a\x00.jpg"]
    manifest = write_manifest(folder / "m.csv", [*({"file": name, **base} for name in odd),
                                                 {"file": "photos/baseline_420.jpg", **base}])
    summary = run_import(gw, folder, manifest, ACTOR)
    assert (summary.imported, summary.rejected) == (1, 3)
    assert count_assets(gw) == 1
    reasons = {row.values["file"]: (code, reason) for row, code, reason in summary.rejections}
    assert reasons[odd[0]][0] == "missing-file" and "symbolic link loop" in reasons[odd[0]][1]
    assert reasons[odd[1]][0] == "missing-file" and "File name too long" in reasons[odd[1]][1]
    assert reasons[odd[2]] == ("bad-manifest", "the 'file' column holds a NUL byte")


def test_photos_no_consent_covers_are_counted_and_listed(gw, archive):
    folder, _ = archive
    patient = add_patient(gw)
    with gw.db.write() as s:  # this patient has no consent on record
        s.execute(delete(Consent).where(Consent.patient_id == patient["id"]))
    base = {"patient": f"nhs|{patient['nhs']}"}
    manifest = write_manifest(folder / "m.csv", [
        {"file": "photos/baseline_420.jpg", **base},
        {"file": "photos/progressive.jpg", **base, "consentLevel": "record", "consentGivenBy": "patient"},
        {"file": "photos/rgb.png", **base},
    ])
    summary = run_import(gw, folder, manifest, ACTOR)
    assert (summary.imported, summary.rejected, summary.uncovered) == (3, 0, 2)
    with open(summary.warnings_csv, newline="") as f:
        warned = {r["file"]: r for r in csv.DictReader(f)}
    assert set(warned) == {"photos/baseline_420.jpg", "photos/rgb.png"}
    assert all(r["code"] == "no-consent" and "hidden" in r["reason"] for r in warned.values())


def test_manifest_problems_are_reported(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("filename,who\nx.jpg,nhs|1\n")
    with pytest.raises(ManifestError, match="lacks column"):
        read_manifest(bad)
    bad.write_text("file,patient,colour\nx.jpg,nhs|1,red\n")
    with pytest.raises(ManifestError, match="unknown column"):
        read_manifest(bad)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="manifest is a folder"):
        read_manifest(tmp_path)
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(ManifestError, match="manifest is not a regular file"):
        read_manifest(tmp_path / "pipe.csv")


def test_cli_import_as_a_real_process(gw, archive, database_url, tmp_path):
    folder, _ = archive
    patient = add_patient(gw)
    rows = standard_rows(patient)[:2] + [{"file": "photos/html.jpg", "patient": f"nhs|{patient['nhs']}"}]
    manifest = write_manifest(folder / "manifest.csv", rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_") or k == "CLINPHOTO_TEST_POSTGRES_URL"}
    env.update(CLINPHOTO_DATA_DIR=str(gw.settings.data_dir), CLINPHOTO_DATABASE_URL=database_url,
               CLINPHOTO_BLOB_DIR=str(gw.settings.blob_dir), COLUMNS="120")
    rejected = tmp_path / "rejected.csv"
    cmd = [sys.executable, "-m", "gateway.cli", "import", str(folder), "--manifest", str(manifest), "--rejected", str(rejected)]
    first = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr  # one row rejected
    assert "imported" in first.stdout and "rejected" in first.stdout
    assert rejected.exists() and "unsupported-type" in rejected.read_text()
    assert count_assets(gw) == 2
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert re.search(r"resumed \(done earlier\)\s*\S\s*2", second.stdout), second.stdout
    assert count_assets(gw) == 2


def test_parallel_import_gives_the_same_result(gw, archive):
    folder, _ = archive
    patient = add_patient(gw)
    manifest = write_manifest(folder / "manifest.csv", standard_rows(patient))
    summary = run_import(gw, folder, manifest, ACTOR, workers=3)
    assert (summary.imported, summary.rejected) == (5, 6)
    assert [r[0].number for r in summary.rejections] == [6, 7, 8, 9, 10, 11]
    with gw.db.read() as s:
        numbers = sorted(s.execute(select(Asset.instance_number)).scalars())
    assert numbers == [1, 2, 3, 4, 5]  # manifest rows number the instances, whatever finished first


def test_manifests_in_other_encodings_or_over_csv_limits_are_one_line_refusals(gw, archive, database_url):
    """A spreadsheet's Windows-1252 or UTF-16 save, a field over csv's 128 KiB limit: each was a traceback
    (UnicodeDecodeError, _csv.Error). A column named twice let the last one win: a second 'file' column chose
    which photo was stored. Now each is a ManifestError naming the line, before anything is imported."""
    folder, _ = archive
    cases = {
        "cp1252.csv": "file,patient,description\nphotos/gray.jpg,nhs|9449305552,café\n".encode("cp1252"),
        "utf16.csv": "file,patient\nphotos/gray.jpg,nhs|9449305552\n".encode("utf-16"),
        "huge.csv": b"file,patient,description\nphotos/gray.jpg,nhs|9449305552," + b"x" * 200_000 + b"\n",
        "twice.csv": b"file,patient,file\nphotos/gray.jpg,nhs|9449305552,photos/rgb.png\n",
    }
    expected = {"cp1252.csv": "not UTF-8 text (byte 0xe9 on line 2)", "utf16.csv": "not UTF-8 text (byte 0xff on line 1)",
                "huge.csv": "line 2: field larger than field limit", "twice.csv": "names column(s) file more than once"}
    for name, data in cases.items():
        (folder / name).write_bytes(data)
        with pytest.raises(ManifestError, match=re.escape(expected[name])):
            read_manifest(folder / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(CLINPHOTO_DATA_DIR=str(gw.settings.data_dir), CLINPHOTO_DATABASE_URL=database_url,
               CLINPHOTO_BLOB_DIR=str(gw.settings.blob_dir), COLUMNS="80")
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "import", str(folder), "--manifest", str(folder / "cp1252.csv")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "save it as CSV UTF-8" in res.stderr  # one line, even in 80 columns
    assert count_assets(gw) == 0


def test_a_row_shifted_by_an_unquoted_comma_is_refused_and_blank_spreadsheet_columns_are_fine(gw, archive):
    """Cells beyond the header's names were dropped without a word (csv.DictReader's None key): 'red, raised' unquoted
    stored the photo with the description cut. Now that row is rejected and the others go in; the empty trailing
    columns a spreadsheet writes are still accepted."""
    folder, _ = archive
    patient = add_patient(gw)
    nhs = f"nhs|{patient['nhs']}"
    manifest = folder / "m.csv"
    manifest.write_text(f"file,patient,description,,\r\nphotos/baseline_420.jpg,{nhs},red, raised\r\n"
                        f"photos/rgb.png,{nhs},flat,,\r\n")
    summary = run_import(gw, folder, manifest, ACTOR)
    assert (summary.imported, summary.rejected) == (1, 1)
    row, code, reason = summary.rejections[0]
    assert (row.number, code) == (1, "bad-manifest") and "column 4" in reason


def test_reports_that_cannot_be_written_where_asked_are_written_beside_the_resume_file(gw, archive, tmp_path):
    """--rejected naming a folder, or a manifest on a share the importer cannot write to: writing the report CSV was a
    traceback after every row had been imported, and the summary and the reasons were lost. Now the report goes
    beside the resume file and a note says where."""
    folder, _ = archive
    patient = add_patient(gw)
    with gw.db.write() as s:  # no consent: the stored row is listed in the warnings CSV
        s.execute(delete(Consent).where(Consent.patient_id == patient["id"]))
    base = {"patient": f"nhs|{patient['nhs']}"}
    manifest = write_manifest(folder / "m.csv", [{"file": "photos/baseline_420.jpg", **base},
                                                 {"file": "photos/missing.jpg", **base}])
    (folder / "m.warnings.csv").mkdir()  # where the warnings would go cannot take a file
    state = tmp_path / "state" / "m.jsonl"
    summary = run_import(gw, folder, manifest, ACTOR, rejected_csv=folder / "photos", state_path=state)
    assert (summary.imported, summary.rejected, summary.uncovered) == (1, 1, 1)
    assert summary.rejected_csv == state.with_suffix(".rejected.csv")
    assert summary.warnings_csv == state.with_suffix(".warnings.csv")
    assert "photos/missing.jpg" in summary.rejected_csv.read_text()
    assert "photos/baseline_420.jpg" in summary.warnings_csv.read_text()
    assert len(summary.notes) == 2 and all("Is a directory" in n and "instead" in n for n in summary.notes)


def test_a_resume_file_that_is_not_one_is_refused_before_anything_is_imported(gw, archive):
    """--state naming a folder or a binary file was a traceback (IsADirectoryError, UnicodeDecodeError); naming the
    manifest itself had the import append its JSON lines to the operator's manifest. Each is now a ManifestError
    before any row is imported, and the file is left as it was; a crash's torn last line is still tolerated."""
    folder, _ = archive
    patient = add_patient(gw)
    manifest = write_manifest(folder / "m.csv", [{"file": "photos/baseline_420.jpg", "patient": f"nhs|{patient['nhs']}"}])
    before = manifest.read_bytes()
    (folder / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    for state, says in ((folder / "photos", "Is a directory"), (folder / "binary.jsonl", "not UTF-8"),
                        (manifest, "first line is not a record")):
        with pytest.raises(ManifestError, match=says):
            run_import(gw, folder, manifest, ACTOR, state_path=state)
    assert manifest.read_bytes() == before and count_assets(gw) == 0
    torn = folder / "torn.jsonl"
    torn.write_text('{"row": "1:photos/baseline_420.jp')  # a crash mid-write of the first record
    assert run_import(gw, folder, manifest, ACTOR, state_path=torn).imported == 1
