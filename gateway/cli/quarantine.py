"""`clinphoto quarantine list|release|reject`: the records officer's reconciliation of quarantined photos (photos naming
a patient no feed had registered, held hidden under a placeholder; ingest.quarantine_unknown_patients). The work is
gateway/core/quarantine.py; each use is on the audit trail under the operator's name (os:NAME)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from gateway.core.patients import Actor

app = typer.Typer(help="Quarantined photos: list them, release them to a registered patient, or reject them.",
                  no_args_is_help=True)

_PHOTOS = typer.Argument(help="Photo ids (from `clinphoto quarantine list`); several at once are all changed or none.")
_REASON = typer.Option("--reason", help="Why (required): recorded on the audit trail with the change.")


def _actor() -> Actor:
    from gateway.cli.common import operator_name
    from gateway.core.patients import Actor

    return Actor(who=operator_name(), role="operator", network="local")


def _refused(message: str) -> typer.Exit:
    from gateway.cli.common import say

    say(f"clinphoto: {message}; nothing was changed")
    return typer.Exit(2)


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, oldest first.")] = 200,
) -> None:
    """Quarantined photos, oldest first: photo id, received (UTC), source, sender (user or AE title), body site,
    specialty, the placeholder patient's id and the identifier the sender gave."""
    from gateway.cli.common import open_gateway, print_table, say
    from gateway.core import quarantine

    gw = open_gateway()
    try:
        photos = quarantine.held(gw, _actor(), limit)
    finally:
        gw.close()
    if not photos:
        say("no quarantined photos")
        return
    rows = [(p.id, p.received_at.strftime("%Y-%m-%d %H:%M:%S"), p.source, p.sender or "-",
             " ".join(x for x in (p.laterality, p.body_site) if x) or "-", p.specialty or "-", p.placeholder, p.identifier)
            for p in photos]
    print_table(("PHOTO", "RECEIVED (UTC)", "SOURCE", "SENDER", "BODY SITE", "SPECIALTY", "HELD UNDER", "IDENTIFIER GIVEN"),
                rows)


@app.command("release")
def release(
    photos: Annotated[list[str], _PHOTOS],
    patient: Annotated[str, typer.Option("--patient", help="The registered patient to file them under: system|value "
                                         "(nhs|..., mrn|..., or a full system) or the patient's id from `clinphoto "
                                         "patients list`.")],
    reason: Annotated[str, _REASON] = "",  # missing: the core's one-line refusal, not typer's usage text
) -> None:
    """File quarantined photos under a registered patient: active, visible as that patient's, routed as a new photo
    would be, and audited with the placeholder identifier they were held under."""
    from gateway.cli.common import open_gateway
    from gateway.core import quarantine

    gw = open_gateway()
    try:
        done = quarantine.release(gw, _actor(), photos, patient, reason)
    except quarantine.QuarantineError as exc:
        raise _refused(str(exc)) from None
    finally:
        gw.close()
    for p in done.photos:
        routed = f"; queued for {p.routed} destination(s)" if p.routed else ""
        print(f"photo {p.id}: released to patient {done.patient} ({done.patient_identifier}), held as {p.identifier}{routed}")


@app.command("reject")
def reject(photos: Annotated[list[str], _PHOTOS], reason: Annotated[str, _REASON] = "") -> None:
    """Mark quarantined photos entered-in-error: out of the record and hidden for good, audited."""
    from gateway.cli.common import open_gateway
    from gateway.core import quarantine

    gw = open_gateway()
    try:
        done = quarantine.reject(gw, _actor(), photos, reason)
    except quarantine.QuarantineError as exc:
        raise _refused(str(exc)) from None
    finally:
        gw.close()
    for photo_id in done:
        print(f"photo {photo_id}: rejected (entered-in-error)")
