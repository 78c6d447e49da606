"""Presentation context negotiation as acceptor (PS3.8 7.1.1.13, PS3.7 D.3.3.4 role selection)."""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import sop_class as _sop

from . import pdu

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# Syntaxes we can decode and encode data sets in (for identifiers and transcoding); storage accepts any syntax.
NATIVE_SYNTAXES = (IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE)

# abstract syntax -> (service, query/retrieve model). Extend with ``register_service`` (MWL, MPPS, ...).
SERVICES: dict[str, tuple[str, str]] = {
    VERIFICATION: ("echo", ""),
    PATIENT_ROOT_FIND: ("find", "PATIENT"),
    STUDY_ROOT_FIND: ("find", "STUDY"),
    PATIENT_ROOT_MOVE: ("move", "PATIENT"),
    STUDY_ROOT_MOVE: ("move", "STUDY"),
    PATIENT_ROOT_GET: ("get", "PATIENT"),
    STUDY_ROOT_GET: ("get", "STUDY"),
    MODALITY_WORKLIST_FIND: ("worklist", "MWL"),
    MPPS: ("mpps", ""),
    STORAGE_COMMITMENT_PUSH: ("commit", ""),
}
STORAGE_CLASSES = frozenset(_sop._STORAGE_CLASSES.values())


def _known_non_storage() -> frozenset[str]:
    out: set[str] = set()
    for name in dir(_sop):
        group = getattr(_sop, name)
        if (
            name.startswith("_")
            and name.endswith("_CLASSES")
            and isinstance(group, dict)
            and name != "_STORAGE_CLASSES"
        ):
            out.update(str(v) for v in group.values())
    return frozenset(out - STORAGE_CLASSES)


# SOP classes we know are not storage: refused unless a service is registered for them.
NON_STORAGE_CLASSES = _known_non_storage()


def register_service(abstract_syntax: str, service: str, model: str = "") -> None:
    SERVICES[abstract_syntax] = (service, model)


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) and not uid.startswith(".")


def classify(abstract_syntax: str) -> tuple[str, str] | None:
    """(service, model) for an abstract syntax, or None if we do not serve it."""
    found = SERVICES.get(abstract_syntax)
    if found is not None:
        return found
    if abstract_syntax in STORAGE_CLASSES:
        return ("store", "")
    if abstract_syntax in NON_STORAGE_CLASSES or not _valid_uid(abstract_syntax):
        return None
    return ("store", "")  # liberal: an unknown (e.g. newer or private) SOP class is taken as storage


@dataclass
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    service: str
    model: str
    peer_is_scu: bool = True  # the requestor may invoke operations on it
    peer_is_scp: bool = False  # the requestor may perform operations we invoke (C-GET's C-STORE sub-operations)

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == IMPLICIT_VR_LE

    @property
    def little_endian(self) -> bool:
        return self.transfer_syntax != EXPLICIT_VR_BE

    @property
    def deflated(self) -> bool:
        return self.transfer_syntax == DEFLATED_EXPLICIT_VR_LE


def negotiate(
    rq: pdu.AssociateRQ,
) -> tuple[list[pdu.PresentationContextAC], dict[int, AcceptedContext], dict[str, pdu.RoleSelection]]:
    """Results for every proposed context, the accepted ones by ID, and the role selection replies."""
    results: list[pdu.PresentationContextAC] = []
    accepted: dict[int, AcceptedContext] = {}
    for pc in rq.contexts:
        kind = classify(pc.abstract_syntax)
        if kind is None:
            results.append(
                pdu.PresentationContextAC(pc.context_id, pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, pc.transfer_syntaxes[0])
            )
            continue
        service, model = kind
        if service == "store":
            chosen = next((ts for ts in pc.transfer_syntaxes if _valid_uid(ts)), None)
        else:
            chosen = next((ts for ts in pc.transfer_syntaxes if ts in NATIVE_SYNTAXES), None)
        if chosen is None:
            results.append(
                pdu.PresentationContextAC(
                    pc.context_id, pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, pc.transfer_syntaxes[0]
                )
            )
            continue
        ctx = AcceptedContext(pc.context_id, pc.abstract_syntax, chosen, service, model)
        role = rq.user.roles.get(pc.abstract_syntax)
        if role is not None:
            ctx.peer_is_scu, ctx.peer_is_scp = role.scu_role, role.scp_role
        accepted[pc.context_id] = ctx
        results.append(pdu.PresentationContextAC(pc.context_id, pdu.PC_ACCEPTANCE, chosen))
    proposed = {pc.abstract_syntax for pc in rq.contexts}
    # We accept whichever roles were proposed (PS3.7 D.3.3.4: the reply echoes the roles the acceptor supports).
    roles = {uid: pdu.RoleSelection(uid, r.scu_role, r.scp_role) for uid, r in rq.user.roles.items() if uid in proposed}
    return results, accepted, roles
