"""`clinphoto token` (dev-mode tokens) and `clinphoto policy explain` (a decision and why)."""

from __future__ import annotations

from typing import Annotated

import typer

policy_app = typer.Typer(help="Access policy.", no_args_is_help=True)


def token(
    sub: Annotated[str, typer.Option("--sub", help="Subject (user id).")],
    role: Annotated[str, typer.Option("--role", help="clinician, medical-illustration, integration-engineer, admin, "
                                                     "privacy-officer, educator or researcher.")],
    specialty: Annotated[list[str], typer.Option("--specialty", help="NHS Treatment Function code; repeat for several.")] = [],  # noqa: B006
    scope: Annotated[list[str], typer.Option("--scope", help="SMART v2 scope, e.g. user/Media.rs; repeat for several. Default user/*.cruds.")] = [],  # noqa: B006
    patient: Annotated[str | None, typer.Option("--patient", help="Patient in context (clinphoto patient id) for patient/ scopes.")] = None,
    purpose: Annotated[str | None, typer.Option("--purpose", help="Default purpose of use carried in the token (TREAT, TRAIN, ...).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    minutes: Annotated[int | None, typer.Option("--minutes", min=1, help="Lifetime; default auth.dev_token_minutes.")] = None,
) -> None:
    """Print a dev-mode bearer token (auth mode dev only)."""
    from gateway.cli.common import console, existing_data_dir, settings_or_exit
    from gateway.core.identity import AuthError, mint_dev_token

    settings = settings_or_exit()
    existing_data_dir(settings)  # else a new signing key would be made here, one no running gateway knows
    try:
        text = mint_dev_token(
            settings, sub=sub, role=role, name=name, specialties=specialty, scopes=scope or None,
            patient=patient, purpose=purpose.upper() if purpose else None, minutes=minutes,
        )
    except AuthError as exc:
        console.print(f"clinphoto: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    print(text)


@policy_app.command("explain")
def explain(
    asset: Annotated[str, typer.Option("--asset", help="Photo id.")],
    sub: Annotated[str, typer.Option("--sub", help="Subject (user id, or AE title with --peer).")] = "",
    role: Annotated[str, typer.Option("--role", help="Role of the subject.")] = "clinician",
    specialty: Annotated[list[str], typer.Option("--specialty", help="NHS Treatment Function code; repeat for several.")] = [],  # noqa: B006
    purpose: Annotated[str, typer.Option("--purpose", help="TREAT, ETREAT, TRAIN, HRESCH or PUBLISH.")] = "TREAT",
    break_glass: Annotated[str | None, typer.Option("--break-glass", help="Break-glass reason (with --purpose ETREAT).")] = None,
    scope: Annotated[list[str], typer.Option("--scope", help="SMART scopes; default user/Media.rs.")] = [],  # noqa: B006
    patient: Annotated[str | None, typer.Option("--patient", help="Patient in context for patient/ scopes.")] = None,
    peer: Annotated[bool, typer.Option("--peer", help="Explain for the configured DICOM peer whose AE title is --sub.")] = False,
) -> None:
    """Print the decision on one photo for a subject and purpose, rule by rule. Exit 0 permit, 1 deny."""
    from gateway.cli.common import console, open_gateway, operator_name, out
    from gateway.core import access_audit
    from gateway.core.identity import Subject, find_dicom_peer, peer_subject
    from gateway.core.policy.rules import decide
    from store import audit
    from store.audit import AuditEntry
    from store.models import Asset

    gw = open_gateway()
    try:
        if peer:
            found = find_dicom_peer(gw.settings, sub)
            if found is None:
                console.print(f"clinphoto: no DICOM peer with AE title {sub!r} in auth.dicom_peers", markup=False)
                raise typer.Exit(2)
            subject = peer_subject(found, None)
        else:
            if not sub:
                console.print("clinphoto: --sub is required", markup=False)
                raise typer.Exit(2)
            subject = Subject(sub=sub, role=role, specialties=tuple(specialty), scopes=tuple(scope or ["user/Media.rs"]),
                              patient=patient, purpose_of_use=purpose.upper(), break_glass_reason=break_glass)
        policy = gw.settings.policy
        with gw.db.read() as session:
            decision = decide(session, subject, asset, settings=policy)
            row = session.get(Asset, asset)
            summary = (
                f"photo {row.id}: patient {row.patient_id}, specialty {row.specialty or '-'}, sensitivity {row.sensitivity}, "
                f"status {row.status}, uploaded by {row.uploaded_by or '-'}" if row is not None else f"photo {asset}: no such photo"
            )
            patient_id = row.patient_id if row is not None else None
        # The record is of the operator explaining, not of the explained person reading: they did not
        # see the photo, so the trail must not say they did (Application Activity, action E).
        access_audit.write(gw, [AuditEntry(
            type_code=audit.APPLICATION_ACTIVITY, action="E", subtype="policy-explain", outcome=audit.SUCCESS,
            agent_who=operator_name(), agent_role="operator", agent_network="local", patient_id=patient_id,
            entities=[
                {"type": "subject", "id": subject.sub, "role": subject.role, "specialties": list(subject.specialties)},
                {"type": "asset", "id": asset},
                *([{"type": "patient", "id": patient_id}] if patient_id is not None else []),
            ],
            detail={"decision": "permit" if decision.permit else "deny", "purpose": decision.purpose,
                    "denied_by": decision.denied_by, "break_glass": bool(subject.break_glass_reason)},
        )])
    finally:
        gw.close()
    out.print(summary, markup=False, highlight=False)
    out.print(f"subject {subject.sub} ({subject.role}; specialties {', '.join(subject.specialties) or '-'}), purpose {decision.purpose}"
              + (f", break-glass: {subject.break_glass_reason}" if subject.break_glass_reason else ""), markup=False, highlight=False)
    out.print("PERMIT" if decision.permit else "DENY", markup=False, highlight=False)
    for reason in decision.reasons:
        out.print(f"  - {reason}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if decision.permit else 1)


def register(app: typer.Typer) -> None:
    app.command("token")(token)
    app.add_typer(policy_app, name="policy")


def settings_yaml(settings) -> str:
    """The auth: and policy: sections as commented YAML: every knob, its description and its current value."""
    import textwrap

    import yaml

    lines: list[str] = []
    for section in ("auth", "policy"):
        model = getattr(settings, section)
        lines.append(f"{section}:")
        for name, info in type(model).model_fields.items():
            for text in textwrap.wrap(info.description or "", 96):
                lines.append(f"  # {text}")
            if name == "dicom_peers":
                from gateway.core.policy.settings import DicomPeer

                lines.append("  # Each peer:")
                for peer_field, peer_info in DicomPeer.model_fields.items():
                    lines.append(f"  #   {peer_field}: {peer_info.description}")
            value = model.model_dump(mode="json")[name]
            dumped = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False).rstrip().splitlines()
            lines.extend("  " + line for line in dumped)
            lines.append("")
    return "\n".join(lines)


@policy_app.command("settings")
def show_settings() -> None:
    """Print the auth and policy settings in force, every knob documented (a starting CLINPHOTO_CONFIG file)."""
    from gateway.cli.common import settings_or_exit

    print(settings_yaml(settings_or_exit()))
