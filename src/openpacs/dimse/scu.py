"""Requestor associations we open ourselves: the C-MOVE sub-association to a move destination.

Uses the same event-driven ``Association`` as the server, so sub-operations send stored bytes unchanged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..dicom.header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from . import pdu
from .association import Association
from .negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, AcceptedContext

if TYPE_CHECKING:
    from .server import Endpoint

MAX_CONTEXTS = 128


def propose(wanted: dict[str, set[str]]) -> list[pdu.PresentationContextRQ]:
    """One context per (SOP class, stored syntax), plus a native-syntax fallback per class; odd IDs, at most 128."""
    out: list[pdu.PresentationContextRQ] = []
    for sop_class in sorted(wanted):
        syntaxes = sorted(wanted[sop_class])
        groups = [[ts] for ts in syntaxes]  # the stored syntax alone, so the peer cannot pick another one
        if not set(syntaxes) >= {EXPLICIT_VR_LE, IMPLICIT_VR_LE}:
            groups.append([EXPLICIT_VR_LE, IMPLICIT_VR_LE])  # fallback we can transcode to
        for group in groups:
            out.append(pdu.PresentationContextRQ(0, sop_class, group))
    out = out[:MAX_CONTEXTS]
    for i, pc in enumerate(out):
        pc.context_id = 2 * i + 1
    return out


async def open_association(
    endpoint: Endpoint, host: str, port: int, called_aet: str, wanted: dict[str, set[str]], tls: bool = False
) -> Association:
    """Associate with a peer as requestor; with ``tls``, over DICOM TLS (BCP195) verifying the peer's certificate
    against ``tls_ca`` and its host name, presenting ``tls_cert`` for mutual TLS."""
    contexts = propose(wanted)
    proposed = {
        pc.context_id: AcceptedContext(
            pc.context_id, pc.abstract_syntax, "", "store", "", peer_is_scu=False, peer_is_scp=True
        )
        for pc in contexts
    }
    return await associate(endpoint, host, port, called_aet, contexts, proposed, tls=tls)


async def associate(
    endpoint: Endpoint,
    host: str,
    port: int,
    called_aet: str,
    contexts: list[pdu.PresentationContextRQ],
    proposed: dict[int, AcceptedContext],
    *,
    roles: dict[str, pdu.RoleSelection] | None = None,
    tls: bool = False,
) -> Association:
    """Associate proposing ``contexts`` (and SCP/SCU role selection ``roles``, PS3.7 D.3.3.4); the accepted ones
    end up in ``Association.contexts`` as the matching ``proposed`` entries."""
    settings = endpoint.settings
    rq = pdu.AssociateRQ(
        protocol_version=1,
        called_aet=called_aet,
        calling_aet=settings.aet,
        application_context=pdu.APPLICATION_CONTEXT,
        contexts=contexts,
        user=pdu.UserInformation(
            max_length=settings.max_pdu if settings.max_pdu > 0 else 0,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            roles=dict(roles or {}),
        ),
    )
    loop = endpoint.loop
    _, assoc = await asyncio.wait_for(
        loop.create_connection(
            lambda: Association(endpoint, requestor=(rq, proposed)),
            host,
            port,
            ssl=endpoint.client_tls if tls else None,
            server_hostname=host if tls else None,
            ssl_handshake_timeout=settings.artim_timeout if tls else None,
        ),
        timeout=settings.network_timeout,
    )
    await asyncio.wait_for(assoc.established, timeout=settings.artim_timeout + 1)
    return assoc
