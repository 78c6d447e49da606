"""Retrieve Capabilities (PS3.18 8.9, Annex H): ``OPTIONS /dicom-web/`` answers a WADL document of the resources
this origin server implements, the methods of each (named by their PS3.18 transaction) and the media types they
take and give. Built from one table, so it lists what the routes serve and nothing more."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .common import DICOM_JSON, DicomWebError, error_response, negotiate_or_406, service_root

WADL_NS = "http://wadl.dev.java.net/2009/02"
WADL = "application/vnd.sun.wadl+xml"

_XML_PARTS = 'multipart/related; type="application/dicom+xml"'
_SEARCH = (DICOM_JSON, _XML_PARTS)
_DICOM = ('multipart/related; type="application/dicom"', 'multipart/related; type="application/octet-stream"')
_METADATA = (DICOM_JSON, _XML_PARTS)
_RENDERED = ("image/jpeg", "image/png")  # one image: an instance, one frame, a thumbnail
_RENDERED_PARTS = ('multipart/related; type="image/jpeg"', 'multipart/related; type="image/png"')  # several
_BULK = ('multipart/related; type="application/octet-stream"',)
_FRAMES = ('multipart/related; type="application/octet-stream"', 'multipart/related; type="image/jls"',
           'multipart/related; type="image/jp2"', 'multipart/related; type="image/jphc"',
           'multipart/related; type="image/jpeg"', 'multipart/related; type="image/dicom-rle"')
_STORE_IN = ('multipart/related; type="application/dicom"', 'multipart/related; type="application/dicom+json"',
             _XML_PARTS)
_STORE_OUT = (DICOM_JSON, "application/dicom+xml")
_SEARCH_PARAMS = ("limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching", "multiplevaluematching")


@dataclass
class _Method:
    name: str  # HTTP method
    id: str  # PS3.18 transaction
    gives: tuple[str, ...] = ()
    takes: tuple[str, ...] = ()
    params: tuple[str, ...] = ()


@dataclass
class _Resource:
    path: str
    methods: list[_Method]
    children: list[_Resource] = field(default_factory=list)


def _retrievable(level: str, uid: str, children: list[_Resource], store: bool = False) -> _Resource:
    """A study, series or instance resource: the resource itself, and its metadata, rendered, thumbnail and pixeldata
    resources."""
    methods = [_Method("GET", f"Retrieve{level}", _DICOM), _Method("DELETE", f"Delete{level}")]
    if store:
        methods.insert(1, _Method("POST", "StoreStudyInstances", _STORE_OUT, _STORE_IN))
    subs = [
        _Resource("metadata", [_Method("GET", f"Retrieve{level}Metadata", _METADATA)]),
        _Resource(
            "rendered",
            [_Method("GET", f"RetrieveRendered{level}", _RENDERED + _RENDERED_PARTS if level == "Instance" else
                     _RENDERED_PARTS)],
        ),
        _Resource("thumbnail", [_Method("GET", f"Retrieve{level}Thumbnail", _RENDERED)]),
        _Resource("pixeldata", [_Method("GET", f"Retrieve{level}PixelData", _BULK)]),
    ]
    return _Resource(uid, methods, subs + children)


_FRAME_LIST = _Resource("frames", [], [_Resource("{frames}", [_Method("GET", "RetrieveFrames", _FRAMES)], [
    _Resource("rendered", [_Method("GET", "RetrieveRenderedFrames", _RENDERED_PARTS + _RENDERED)]),
    _Resource("thumbnail", [_Method("GET", "RetrieveFramesThumbnail", _RENDERED)]),
])])
_BULKDATA = _Resource("bulkdata", [], [_Resource("{path}", [_Method("GET", "RetrieveBulkdata", _BULK)])])
_INSTANCE = _retrievable("Instance", "{instance}", [_FRAME_LIST, _BULKDATA])
_SERIES = _retrievable("Series", "{series}", [
    _Resource("instances", [_Method("GET", "SearchForStudySeriesInstances", _SEARCH, params=_SEARCH_PARAMS)],
              [_INSTANCE]),
])
_STUDY = _retrievable("Study", "{study}", [
    _Resource("series", [_Method("GET", "SearchForStudySeries", _SEARCH, params=_SEARCH_PARAMS)], [_SERIES]),
    _Resource("instances", [_Method("GET", "SearchForStudyInstances", _SEARCH, params=_SEARCH_PARAMS)]),
], store=True)
RESOURCES = [
    _Resource("studies", [_Method("GET", "SearchForStudies", _SEARCH, params=_SEARCH_PARAMS),
                          _Method("POST", "StoreInstances", _STORE_OUT, _STORE_IN)], [_STUDY]),
    _Resource("series", [_Method("GET", "SearchForSeries", _SEARCH, params=_SEARCH_PARAMS)]),
    _Resource("instances", [_Method("GET", "SearchForInstances", _SEARCH, params=_SEARCH_PARAMS)]),
]


def wadl(base: str) -> bytes:
    app = ET.Element("application", {"xmlns": WADL_NS})
    resources = ET.SubElement(app, "resources", base=base + "/")
    for r in RESOURCES:
        _resource(resources, r)
    return ET.tostring(app, encoding="utf-8", xml_declaration=True)


def _resource(parent: ET.Element, r: _Resource) -> None:
    el = ET.SubElement(parent, "resource", path=r.path)
    if r.path.startswith("{"):
        ET.SubElement(el, "param", name=r.path.strip("{}"), style="template", type="xsd:string", required="true")
    for m in r.methods:
        method = ET.SubElement(el, "method", name=m.name, id=m.id)
        request = ET.SubElement(method, "request")
        for p in m.params:
            ET.SubElement(request, "param", name=p, style="query")
        if m.gives:
            accept = ET.SubElement(request, "param", name="Accept", style="header", default=m.gives[0])
            for media in m.gives:
                ET.SubElement(accept, "option", value=media)
        for media in m.takes:
            ET.SubElement(request, "representation", mediaType=media)
        response = ET.SubElement(method, "response", status="204" if m.name == "DELETE" else "200")
        for media in m.gives:
            ET.SubElement(response, "representation", mediaType=media)
    for child in r.children:
        _resource(el, child)


async def capabilities(request: Request) -> Response:
    try:
        media = negotiate_or_406(request, [WADL, "application/xml", "text/xml"])
    except DicomWebError as e:
        return error_response(e.status, e.message)
    return Response(wadl(service_root(request)), media_type=media, headers={"Allow": "GET, POST, DELETE, OPTIONS"})


def routes() -> list[Route]:
    return [Route("/", capabilities, methods=["OPTIONS"])]
