"""WADO-RS / WADO-URI against the real ASGI app served by uvicorn on a free port, driven by dicomweb-client and
requests: retrieval as stored and transcoded (pixel-exact), metadata with BulkDataURIs, frames, bulk data, rendered,
thumbnails, and the error codes."""

from __future__ import annotations

import io
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from helpers import dicomdata
from helpers.ports import free_port
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

warnings.filterwarnings("ignore", module="pydicom")

FILES = {
    "ct": "CT_small.dcm",
    "mr": "MR_small.dcm",
    "jls": "emri_small_jpeg_ls_lossless.dcm",  # multi-frame JPEG-LS
    "rgb2": "SC_rgb_2frame.dcm",  # multi-frame RGB native
    "us": "US1_UNCR.dcm",
    "ybr": "examples_ybr_color.dcm",  # 30-frame JPEG baseline YBR
    "j2k": "JPEG2000.dcm",
    "pal": "OBXXXX1A.dcm",
    "mono1": "RG1_UNCR.dcm",
    "emri": "emri_small.dcm",  # native multi-frame (same SOP Instance UID as "jls": given a new one below)
}


def _load(key: str, name: str) -> bytes:
    data = Path(dicomdata.testdata_file(name)).read_bytes()
    if key != "emri":
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


class Info:
    def __init__(self, data: bytes) -> None:
        self.bytes = data
        self.ds = pydicom.dcmread(io.BytesIO(self.bytes))
        self.study = self.ds.StudyInstanceUID
        self.series = self.ds.SeriesInstanceUID
        self.sop = self.ds.SOPInstanceUID
        self.ts = str(self.ds.file_meta.TransferSyntaxUID)

    @property
    def url(self) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{self.sop}"

    def pixels(self) -> np.ndarray:
        return pydicom.dcmread(io.BytesIO(self.bytes)).pixel_array


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import uvicorn

    from openpacs.config import Settings
    from openpacs.context import build_context
    from openpacs.services.types import Source
    from openpacs.web.app import build_app

    data_dir = tmp_path_factory.mktemp("wado") / "data"
    ctx = build_context(Settings(data_dir=data_dir))
    infos = {}
    for key, name in FILES.items():
        info = Info(_load(key, name))
        outcome = ctx.ingest.store_file(info.bytes, Source("TEST"))
        assert outcome.ok, outcome
        infos[key] = info
    port = free_port()
    config = uvicorn.Config(build_app(ctx), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/dicom-web"
    yield base, infos, ctx
    server.should_exit = True
    thread.join(10)
    ctx.close()


@pytest.fixture(scope="module")
def client(live):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=live[0])


def _parts(resp: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    media, params = parse_media_type(resp.headers["content-type"])
    assert media == "multipart/related"
    parser = MultipartParser(params["boundary"])
    parts = parser.feed(resp.content)
    parser.close()
    return [(p.headers, p.content) for p in parts]


# ---------------------------------------------------------------------------------------------------------------- DICOM


def test_retrieve_instance_as_stored_is_byte_identical_but_preamble(live, client) -> None:
    _, infos, _ = live
    for info in infos.values():
        ds = client.retrieve_instance(info.study, info.series, info.sop, media_types=(("application/dicom", "*"),))
        assert ds.SOPInstanceUID == info.sop
        assert str(ds.file_meta.TransferSyntaxUID) == info.ts
    # raw bytes: identical after the preamble, and the preamble zeroed
    base, infos, _ = live
    info = infos["ct"]
    r = requests.get(
        base + info.url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    )
    assert r.status_code == 200
    assert r.headers.get("transfer-encoding") == "chunked"  # see WadoRS._send_instances: faster for urllib3 clients
    [(headers, body)] = _parts(r)
    assert int(headers["content-length"]) == len(body)
    assert body[:128] == bytes(128)
    assert body[128:] == info.bytes[128:]
    assert headers["content-type"] == f"application/dicom; transfer-syntax={info.ts}"


def test_hostile_preamble_is_zeroed(live) -> None:
    base, _, ctx = live
    from openpacs.services.types import Source

    data = bytearray(Path(dicomdata.testdata_file("MR_small_implicit.dcm")).read_bytes())
    ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    data[:4] = b"MZ\x90\x00"  # a PE header in the preamble
    data[4:16] = b"\x7fELF" + bytes(8)
    assert ctx.ingest.store_file(bytes(data), Source("TEST")).ok
    url = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for ts in ("*", ExplicitVRLittleEndian):
        r = requests.get(url, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ts}'})
        [(_, body)] = _parts(r)
        assert body[:128] == bytes(128), ts
    r = requests.get(
        base + "/wado",
        params={
            "requestType": "WADO",
            "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID,
            "contentType": "application/dicom",
            "transferSyntax": ImplicitVRLittleEndian,
        },
    )
    assert r.status_code == 200 and r.content[:128] == bytes(128)


def test_retrieve_study_and_series(live, client) -> None:
    _, infos, _ = live
    info = infos["jls"]
    series = client.retrieve_series(info.study, info.series, media_types=(("application/dicom", "*"),))
    assert info.sop in [d.SOPInstanceUID for d in series]
    study = client.retrieve_study(info.study, media_types=(("application/dicom", "*"),))
    assert info.sop in {d.SOPInstanceUID for d in study}


def test_default_syntax_is_explicit_little_endian(live) -> None:
    base, infos, _ = live
    for key in ("jls", "j2k", "ybr", "mr"):
        info = infos[key]
        for accept in ('multipart/related; type="application/dicom"', None):
            r = requests.get(base + info.url, headers={"Accept": accept} if accept else {})
            assert r.status_code == 200
            ds = pydicom.dcmread(io.BytesIO(_parts(r)[0][1]))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, key
        assert ds.SOPInstanceUID == info.sop
        if key != "ybr":  # lossless sources: pixel-exact
            np.testing.assert_array_equal(ds.pixel_array, info.pixels())


@pytest.mark.parametrize(
    "target",
    [JPEGLSLossless, JPEG2000Lossless, HTJ2KLossless, RLELossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian],
)
def test_lossless_transcoding_is_pixel_exact(live, target) -> None:
    base, infos, _ = live
    for key in ("ct", "mr", "jls", "rgb2", "us", "emri"):
        info = infos[key]
        r = requests.get(
            base + info.url,
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={target}'},
        )
        assert r.status_code == 200, (key, r.text)
        [(headers, body)] = _parts(r)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={target}"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == target
        assert ds.SOPInstanceUID == info.sop
        np.testing.assert_array_equal(ds.pixel_array, info.pixels(), err_msg=f"{key} -> {target}")


def test_dicomweb_client_transcoded_retrieval(live, client) -> None:
    _, infos, _ = live
    info = infos["ct"]
    ds = client.retrieve_instance(
        info.study, info.series, info.sop, media_types=(("application/dicom", JPEGLSLossless),)
    )
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(ds.pixel_array, info.pixels())


def test_accept_preference_and_406(live) -> None:
    base, infos, _ = live
    info = infos["ybr"]  # JPEG baseline: never re-encoded lossy, never transcoded to JPEG baseline from native
    r = requests.get(
        base + infos["ct"].url,
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}'},
    )
    assert r.status_code == 406
    r = requests.get(base + infos["ct"].url, headers={"Accept": "text/html"})
    assert r.status_code == 406
    # preference list: the first acceptable one wins
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}, '
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEGLSLossless}; q=0.5'
    )
    r = requests.get(base + info.url, headers={"Accept": accept})
    [(headers, _)] = _parts(r)
    assert headers["content-type"].endswith(JPEGBaseline8Bit)
    r = requests.get(base + infos["ct"].url, headers={"Accept": accept})
    [(headers, _)] = _parts(r)
    assert headers["content-type"].endswith(JPEGLSLossless)


def test_unknown_uids_404(live) -> None:
    base, infos, _ = live
    info = infos["ct"]
    for url in (
        "/studies/1.2.3",
        f"/studies/{info.study}/series/1.2.3",
        f"/studies/{info.study}/series/{info.series}/instances/1.2.3",
        f"/studies/{info.study}/series/{info.series}/instances/1.2.3/metadata",
        f"/studies/{info.study}/series/{info.series}/instances/1.2.3/frames/1",
        f"/studies/{info.study}/series/{info.series}/instances/1.2.3/rendered",
        "/studies/1.2.3/metadata",
        "/studies/1.2.3/thumbnail",
    ):
        assert requests.get(base + url).status_code == 404, url


# ------------------------------------------------------------------------------------------------------------- metadata


def test_metadata_and_bulkdata(live, client) -> None:
    _, infos, _ = live
    for key in ("ct", "jls", "rgb2"):
        info = infos[key]
        meta = client.retrieve_instance_metadata(info.study, info.series, info.sop)
        assert meta["00080018"]["Value"] == [info.sop]
        assert meta["00280010"]["Value"] == [int(info.ds.Rows)]
        uri = meta["7FE00010"]["BulkDataURI"]
        assert uri.startswith("http") and uri.endswith("/bulkdata/7FE00010")
        # by default uncompressed little endian, decoded from a lossless stored form (PS3.18 8.7.3.4)
        [data] = client.retrieve_bulkdata(uri)
        if info.ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            assert data == bytes(info.ds.PixelData)
        else:
            assert data == info.pixels().tobytes()  # 16-bit grey: little endian on this machine as on the wire
            # as stored when asked: one compressed frame per part
            n = int(info.ds.get("NumberOfFrames", 1))
            frames = client.retrieve_bulkdata(uri, media_types=(("image/jls", "*"),))
            assert frames == list(generate_frames(info.ds.PixelData, number_of_frames=n))
    series_meta = client.retrieve_series_metadata(infos["mr"].study, infos["mr"].series)
    assert [m["00080018"]["Value"][0] for m in series_meta] == [infos["mr"].sop]
    study_meta = client.retrieve_study_metadata(infos["ct"].study)
    assert infos["ct"].sop in {m["00080018"]["Value"][0] for m in study_meta}


def test_bulkdata_of_other_binary_values(live) -> None:
    base, infos, _ = live
    info = infos["pal"]  # palette colour LUT data is OW bulk data
    r = requests.get(base + info.url + "/metadata")
    meta = r.json()[0]
    uri = meta["00281201"].get("BulkDataURI")
    if uri is None:  # small enough to be inline
        return
    r = requests.get(uri, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.content == bytes(info.ds[0x00281201].value)


def _native_model(root) -> dict:
    """A NativeDicomModel element as {tag: (vr, values)}; binary values, File Meta, group lengths and private
    attributes (whose VR each toolkit takes from its own private dictionary) left out."""
    out = {}
    for attr in root:
        if not attr.tag.endswith("DicomAttribute"):
            continue
        tag, vr = attr.get("tag"), attr.get("vr")
        if tag.startswith("0002") or tag.endswith("0000") or int(tag[:4], 16) % 2 or any(
            c.tag.split("}")[-1] in ("BulkData", "InlineBinary") for c in attr
        ):
            continue
        values = []
        for c in attr:
            kind = c.tag.split("}")[-1]
            if kind == "Item":
                values.append(_native_model(c))
            elif kind == "PersonName":
                values.append({g.tag.split("}")[-1]: {p.tag.split("}")[-1]: p.text for p in g} for g in c})
            elif vr in ("DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"):
                values.append(round(float(c.text), 6))
            else:
                values.append((c.text or "").strip())
        out[tag] = (vr, values)
    return out


def _private_tags(root) -> set[tuple[str, str | None]]:
    return {(a.get("tag"), a.get("privateCreator")) for a in root
            if a.tag.endswith("DicomAttribute") and int(a.get("tag")[:4], 16) % 2}


def test_metadata_as_dicom_xml_matches_dcmtk(live, require_dcmtk, tmp_path) -> None:
    """WADO-RS metadata as multipart/related; type="application/dicom+xml" (required by PS3.18 Table 10.4.4-1),
    compared attribute by attribute with DCMTK's own PS3.19 writer (dcm2xml --native-format) on the stored file."""
    import subprocess
    import xml.etree.ElementTree as ET

    from helpers import dcmtk

    base, infos, _ = live
    private_seen = 0
    for key in ("ct", "mr", "us", "ybr"):
        info = infos[key]
        r = requests.get(base + info.url + "/metadata",
                         headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
        assert r.status_code == 200, r.text
        [(headers, body)] = _parts(r)
        assert headers["content-type"] == "application/dicom+xml"
        ours = _native_model(ET.fromstring(body))
        path = tmp_path / f"{key}.dcm"
        path.write_bytes(info.bytes)
        out = subprocess.run([dcmtk.find_tool("dcm2xml"), "--native-format", str(path)], capture_output=True,
                             check=True, env=dcmtk.dcmtk_env())
        theirs = _native_model(ET.fromstring(out.stdout))
        # Available Transfer Syntax UID (0008,3002) is added by the server (the stored syntax, PS3.18 Table 10.4-1;
        # OHIF tells video from it); it is not in the file, so DCMTK cannot show it
        import pydicom

        stored_ts = str(pydicom.dcmread(io.BytesIO(info.bytes), stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert ours.pop("00083002") == ("UI", [stored_ts]), key
        # private attributes: the same gggg00ee tags, each naming the same Private Creator (PS3.19 Table A.1.5-2)
        private = _private_tags(ET.fromstring(body))
        assert private == _private_tags(ET.fromstring(out.stdout)), key
        private_seen += len([t for t, creator in private if creator])
        assert len(ours) > 20
        assert ours == theirs, {t: (ours.get(t), theirs.get(t)) for t in set(ours) | set(theirs)
                                if ours.get(t) != theirs.get(t)}
    assert private_seen > 10  # the CT carries GE private blocks


def test_pixeldata_and_bulk_data_of_whole_resources(live, client) -> None:
    """PS3.18 10.4.1.1.5-6 (multipart/related; type="application/octet-stream" is required for them): dicomweb-client
    fetches .../pixeldata of a series (native, and JPEG-LS decoded) and the bulk data of an instance resource; each
    part carries the Content-Location of the BulkDataURI the metadata gives."""
    base, infos, _ = live
    for key, resource in (("ct", "series"), ("jls", "instance")):  # jls shares its series with emri
        info = infos[key]
        url = f"{base}/studies/{info.study}/series/{info.series}"
        url += f"/instances/{info.sop}/pixeldata" if resource == "instance" else "/pixeldata"
        [data] = client.retrieve_bulkdata(url, media_types=("application/octet-stream",))
        assert data == info.pixels().astype("<u2").tobytes(), key
    info = infos["pal"]  # pixel data, and the palette LUT data (OW) when large enough to be bulk data
    meta = requests.get(base + info.url + "/metadata", timeout=30).json()[0]
    uris = {v["BulkDataURI"] for v in meta.values() if "BulkDataURI" in v}
    assert any(u.endswith("/bulkdata/7FE00010") for u in uris)
    r = requests.get(base + info.url, headers={"Accept": 'multipart/related; type="application/octet-stream"'},
                     timeout=30)
    assert r.status_code == 200, r.text
    parts = _parts(r)
    assert {h["content-location"] for h, _ in parts} == uris
    for headers, body in parts:
        direct = requests.get(headers["content-location"], headers={"Accept": "application/octet-stream"}, timeout=30)
        assert direct.status_code == 200 and direct.content == body, headers["content-location"]
    # pixeldata only as octet-stream parts
    r = requests.get(base + info.url + "/pixeldata", headers={"Accept": "application/dicom"}, timeout=30)
    assert r.status_code == 406


# --------------------------------------------------------------------------------------------------------------- frames


def test_frames_native_and_compressed(live, client) -> None:
    _, infos, _ = live
    info = infos["emri"]  # native multi-frame
    full = info.pixels()
    frames = client.retrieve_instance_frames(info.study, info.series, info.sop, frame_numbers=[1, 5, 10])
    assert len(frames) == 3
    for n, data in zip([1, 5, 10], frames, strict=True):
        np.testing.assert_array_equal(np.frombuffer(data, "<u2").reshape(full.shape[1:]), full[n - 1])

    info = infos["jls"]
    full = info.pixels()
    frames = client.retrieve_instance_frames(
        info.study, info.series, info.sop, frame_numbers=[2, 3], media_types=("image/jls",)
    )
    assert all(f[:2] == b"\xff\xd8" for f in frames)
    # octet-stream of compressed data: decoded server-side
    frames = client.retrieve_instance_frames(
        info.study, info.series, info.sop, frame_numbers=[2], media_types=("application/octet-stream",)
    )
    np.testing.assert_array_equal(np.frombuffer(frames[0], "<u2").reshape(full.shape[1:]), full[1])


def test_frames_transcoded_and_as_stored(live) -> None:
    base, infos, _ = live
    info = infos["ct"]
    expected = info.pixels()
    r = requests.get(base + info.url + "/frames/1", headers={"Accept": 'multipart/related; type="image/jls"'})
    [(headers, body)] = _parts(r)
    assert headers["content-type"] == f"image/jls; transfer-syntax={JPEGLSLossless}"
    import jpeg_ls

    np.testing.assert_array_equal(jpeg_ls.decode(np.frombuffer(body, np.uint8)).astype(expected.dtype), expected)
    # OHIF style: octet-stream with transfer-syntax=* gives the stored bytes
    info = infos["jls"]
    r = requests.get(
        base + info.url + "/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    [(headers, body)] = _parts(r)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={JPEGLSLossless}"
    assert body[:2] == b"\xff\xd8"
    # single part
    r = requests.get(base + infos["ct"].url + "/frames/1", headers={"Accept": "application/octet-stream"})
    assert r.headers["content-type"].startswith("application/octet-stream")
    assert r.content == bytes(infos["ct"].ds.PixelData)


def test_frames_errors(live) -> None:
    base, infos, _ = live
    url = base + infos["ct"].url
    assert requests.get(url + "/frames/2").status_code == 404
    assert requests.get(url + "/frames/0").status_code == 400
    assert requests.get(url + "/frames/a,b").status_code == 400
    assert (
        requests.get(url + "/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'}).status_code == 406
    )
    # a frame asked twice: 400 (PS3.4 Y.3.2.1.1); 1500 times frame 1 would otherwise be a 1500-frame response
    assert requests.get(url + "/frames/1,1").status_code == 400
    assert requests.get(base + infos["ybr"].url + "/frames/3,1,3/rendered").status_code == 400
    # a long list of distinct frames streams in the order asked
    ybr = infos["ybr"]
    order = [30, *range(1, 30)]
    r = requests.get(base + ybr.url + "/frames/" + ",".join(map(str, order)),
                     headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=*'})
    parts = _parts(r)
    assert len(parts) == 30 and parts[0][1] == list(generate_frames(ybr.ds.PixelData, number_of_frames=30))[29]


# ------------------------------------------------------------------------------------------------------------- rendered


def _image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_rendered(live, client) -> None:
    base, infos, _ = live
    info = infos["ct"]
    data = client.retrieve_instance_rendered(info.study, info.series, info.sop, media_types=("image/png",))
    im = _image(data)
    assert im.format == "PNG" and im.size == (128, 128)
    r = requests.get(
        base + info.url + "/rendered",
        params={"window": "40,400", "viewport": "64,64", "quality": "50"},
        headers={"Accept": "image/jpeg"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert _image(r.content).size == (64, 64)
    for bad in (
        {"window": "40"},
        {"viewport": "0,0"},
        {"quality": "1000"},
        {"viewport": "64,64,0,0,0,0"},  # an empty source region
        {"viewport": "64,64,500,500,10,10"},  # a source region outside the 128 x 128 image
    ):
        assert requests.get(base + info.url + "/rendered", params=bad).status_code == 400, bad
    assert requests.get(base + info.url + "/rendered", headers={"Accept": "video/mp4"}).status_code == 406
    # frames and colour
    ybr = infos["ybr"]
    frame = client.retrieve_instance_frames_rendered(ybr.study, ybr.series, ybr.sop, frame_numbers=[15])
    assert _image(frame).mode == "RGB"
    # a series, a study or a frame list is several images: multipart, and a single-part type alone is a 406
    # (PS3.18 10.4.4)
    r = requests.get(f"{base}/studies/{info.study}/series/{info.series}/rendered")
    assert r.status_code == 200 and r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    assert [_image(body).format for _, body in _parts(r)] == ["JPEG"]  # the CT series holds one image
    r = requests.get(f"{base}/studies/{ybr.study}/rendered", headers={"Accept": 'multipart/related; type="image/png"'})
    images = [_image(body) for _, body in _parts(r)]
    assert len(images) == 30 and {im.format for im in images} == {"PNG"}  # every frame of the 30-frame instance
    for url in (f"/studies/{info.study}/rendered", ybr.url + "/frames/1,2/rendered"):
        assert requests.get(base + url, headers={"Accept": "image/jpeg"}).status_code == 406, url
    r = requests.get(base + ybr.url + "/frames/1,2/rendered")
    assert len(_parts(r)) == 2
    # the accept query parameter (PS3.18 8.3.3.1), for links such as <img src=".../rendered?accept=image/png">
    r = requests.get(base + info.url + "/rendered", params={"accept": "image/png"}, headers={"Accept": "image/jpeg"})
    assert r.headers["content-type"] == "image/png" and _image(r.content).format == "PNG"
    # MONOCHROME1 renders inverted: the brightest stored value is darkest
    m1 = infos["mono1"]
    r = requests.get(base + m1.url + "/rendered", headers={"Accept": "image/png"})
    img = np.asarray(_image(r.content)).astype(int)
    raw = m1.pixels()
    assert img[raw == raw.max()].mean() < img[raw == raw.min()].mean()


def test_thumbnails(live) -> None:
    base, infos, _ = live
    info = infos["ybr"]
    for url in (
        f"/studies/{info.study}/thumbnail",
        f"/studies/{info.study}/series/{info.series}/thumbnail",
        info.url + "/thumbnail",
        info.url + "/frames/3/thumbnail",
    ):
        r = requests.get(base + url)
        assert r.status_code == 200, url
        assert max(_image(r.content).size) <= 128


# ------------------------------------------------------------------------------------------------------------ WADO-URI


def test_wado_uri(live) -> None:
    base, infos, _ = live
    info = infos["ct"]
    q = {"requestType": "WADO", "studyUID": info.study, "seriesUID": info.series, "objectUID": info.sop}
    r = requests.get(base + "/wado", params=q)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = requests.get(
        base + "/wado",
        params={
            **q,
            "contentType": "image/png",
            "windowCenter": "40",
            "windowWidth": "400",
            "rows": "64",
            "columns": "64",
        },
    )
    assert r.status_code == 200 and _image(r.content).size == (64, 64)
    r = requests.get(base + "/wado", params={**q, "contentType": "application/dicom"})
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, info.pixels())
    r = requests.get(base + "/wado", params={**q, "contentType": "application/dicom", "transferSyntax": JPEGLSLossless})
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(ds.pixel_array, info.pixels())
    ybr = infos["ybr"]
    r = requests.get(
        base + "/wado",
        params={
            "requestType": "WADO",
            "studyUID": ybr.study,
            "seriesUID": ybr.series,
            "objectUID": ybr.sop,
            "frameNumber": "7",
        },
    )
    assert r.status_code == 200 and _image(r.content).mode == "RGB"
    assert requests.get(base + "/wado", params={**q, "requestType": "X"}).status_code == 400
    assert requests.get(base + "/wado", params={**q, "objectUID": "1.2.3"}).status_code == 404
    assert requests.get(base + "/wado", params={**q, "contentType": "text/html"}).status_code == 406
    assert requests.get(base + "/wado", params={**q, "windowCenter": "x", "windowWidth": "1"}).status_code == 400
    # not a UID: 400; a UID we cannot produce: 406 (PS3.18 9.4.2.4)
    dicom = {**q, "contentType": "application/dicom"}
    assert requests.get(base + "/wado", params={**dicom, "transferSyntax": "abc"}).status_code == 400
    assert requests.get(base + "/wado", params={**dicom, "transferSyntax": "1.2.3.4"}).status_code == 406
    # asked for a de-identified object: refused, never the identified one (PS3.18 9.4.2.3)
    r = requests.get(base + "/wado", params={**dicom, "anonymize": "yes"})
    assert r.status_code == 400 and b"anonymize" in r.content


def test_wado_uri_at_root(live) -> None:
    base, infos, _ = live
    info = infos["mr"]
    root = base.rsplit("/dicom-web", 1)[0]
    q = {"requestType": "WADO", "studyUID": info.study, "seriesUID": info.series, "objectUID": info.sop}
    r = requests.get(root + "/wado", params={**q, "contentType": "application/dicom", "transferSyntax": "*"})
    assert r.status_code == 200, "WADO-URI must also be mounted at /wado on the root (web/app.py)"
    assert r.content[128:] == info.bytes[128:]


def test_single_part_dicom_and_accept_parameter(live) -> None:
    """PS3.18 10.4.4: a bare application/dicom body for an instance, never for a study or series; the accept query
    parameter overrides the header (8.3.3.1)."""
    base, infos, _ = live
    info = infos["jls"]
    r = requests.get(base + info.url, headers={"Accept": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.SOPInstanceUID == info.sop and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, info.pixels())
    r = requests.get(base + info.url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert pydicom.dcmread(io.BytesIO(r.content)).file_meta.TransferSyntaxUID == info.ts
    # the multipart form when it is preferred
    accept = 'multipart/related; type="application/dicom", application/dicom; q=0.5'
    assert len(_parts(requests.get(base + info.url, headers={"Accept": accept}))) == 1
    for url in (f"/studies/{info.study}", f"/studies/{info.study}/series/{info.series}"):
        assert requests.get(base + url, headers={"Accept": "application/dicom"}).status_code == 406, url
    implicit = f'multipart/related; type="application/dicom"; transfer-syntax={ImplicitVRLittleEndian}'
    r = requests.get(base + infos["ct"].url, params={"accept": implicit})
    [(headers, _)] = _parts(r)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ImplicitVRLittleEndian}"


def test_bulkdata_ranges_and_compressed_pixels(live) -> None:
    base, infos, _ = live
    ct, jls = infos["ct"], infos["jls"]
    url = base + ct.url + "/bulkdata/7FE00010"
    octet = {"Accept": "application/octet-stream"}
    pixels = bytes(ct.ds.PixelData)
    r = requests.get(url, headers={**octet, "Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == pixels[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{len(pixels)}"
    r = requests.get(url, headers={**octet, "Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == pixels[-10:]
    for unsatisfiable in ("bytes=-0", f"bytes={len(pixels)}-"):
        r = requests.get(url, headers={**octet, "Range": unsatisfiable})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(pixels)}", unsatisfiable
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-2"):
        r = requests.get(url, headers={**octet, "Range": ignored})
        assert r.status_code == 200 and r.content == pixels, ignored
    # a compressed instance's pixel data asked as a single octet-stream body: decoded, every frame
    r = requests.get(base + jls.url + "/bulkdata/7FE00010", headers=octet)
    assert r.status_code == 200 and r.content == jls.pixels().tobytes()
    r = requests.get(base + infos["j2k"].url + "/frames/1", headers=octet)
    assert r.status_code == 200 and len(r.content) == infos["j2k"].pixels().nbytes


def test_pixeldata_of_an_instance_without_pixels(live) -> None:
    base, _, ctx = live
    from pydicom.dataset import Dataset, FileMetaDataset

    from openpacs.services.types import Source

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (pydicom.uid.generate_uid() for _ in range(3))
    ds.PatientID, ds.Modality = "SR1", "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert ctx.ingest.store_file(buf.getvalue(), Source("TEST")).ok
    url = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    octet_parts = {"Accept": 'multipart/related; type="application/octet-stream"'}
    assert requests.get(url + "/pixeldata", headers=octet_parts).status_code == 404
    assert requests.get(url + "/bulkdata/7FE00010").status_code == 404


def test_delete_during_a_series_retrieve_lets_it_finish(live) -> None:
    """A viewer streams a 40-instance series (21 MB) while an administrator deletes it: the retrieve that started
    first ends complete (the blobs stay readable for a grace period), and the series is gone for the next one."""
    base, _, ctx = live
    from openpacs.services.types import Source

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(7)
    sops = []
    for n in range(40):
        ds = pydicom.dcmread(dicomdata.testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.Rows = ds.Columns = 512
        ds.InstanceNumber = n + 1
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        assert ctx.ingest.store_file(buf.getvalue(), Source("TEST")).ok
        sops.append(ds.SOPInstanceUID)
    url = f"{base}/studies/{study}/series/{series}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with requests.get(url, headers=accept, stream=True, timeout=60) as r:
        assert r.status_code == 200
        body = r.raw.read(1 << 20)  # the first megabyte, then the delete
        assert requests.delete(url, timeout=30).status_code == 204
        body += r.raw.read()
    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    parser = MultipartParser(parse_media_type(r.headers["content-type"])[1]["boundary"])
    parts = parser.feed(body)
    parser.close()
    assert [pydicom.dcmread(io.BytesIO(p.content)).SOPInstanceUID for p in parts] == sops
    assert requests.get(url, headers=accept, timeout=30).status_code == 404


def test_rendered_series_skips_an_image_the_viewport_does_not_fit(live) -> None:
    """Two images of different sizes, a source region inside the first only: the multipart ends complete with the
    image that could be rendered (before, the stream broke off after it)."""
    base, _, ctx = live
    from openpacs.services.types import Source

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for n, size in enumerate((256, 64)):
        ds = pydicom.dcmread(dicomdata.testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.Rows = ds.Columns = size
        ds.InstanceNumber = n + 1
        ds.PixelData = np.zeros((size, size), dtype=np.uint16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        assert ctx.ingest.store_file(buf.getvalue(), Source("TEST")).ok
    r = requests.get(f"{base}/studies/{study}/series/{series}/rendered", params={"viewport": "32,32,100,100,50,50"})
    assert r.status_code == 200
    assert [_image(body).size for _, body in _parts(r)] == [(32, 32)]


def test_frames_fast_path_matches_the_routed_answer(live) -> None:
    """A viewer's frame request (no query string) is answered by wado.FramesFastPath; with ``?accept=`` the same
    request goes through the routes. Both give the same frames, length-delimited (not chunked), the same errors."""
    base, infos, _ = live
    octet = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    for key, numbers in (("ct", "1"), ("emri", "3,1,7"), ("jls", "2")):
        info = infos[key]
        url = base + info.url + "/frames/" + numbers
        fast = requests.get(url, headers={"Accept": octet})
        routed = requests.get(url, params={"accept": octet})
        assert fast.status_code == routed.status_code == 200, key
        assert "chunked" not in fast.headers.get("transfer-encoding", "")
        assert int(fast.headers["content-length"]) == len(fast.content)
        assert fast.headers["content-type"].split(";")[:2] == routed.headers["content-type"].split(";")[:2]
        got = [body for _, body in _parts(fast)]
        assert got == [body for _, body in _parts(routed)] and len(got) == len(numbers.split(","))
    info = infos["emri"]
    full = info.pixels()
    [(_, body)] = _parts(requests.get(base + info.url + "/frames/4", headers={"Accept": octet}))
    np.testing.assert_array_equal(np.frombuffer(body, "<u2").reshape(full.shape[1:]), full[3])
    for path, status in (("/frames/999", 404), ("/frames/0", 400)):
        assert requests.get(base + info.url + path).status_code == status
        assert requests.get(base + info.url + path, params={"accept": "*/*"}).status_code == status
    missing = f"{base}/dicom-web/studies/{info.study}/series/{info.series}/instances/1.2.3.4/frames/1"
    assert requests.get(missing).status_code == 404
