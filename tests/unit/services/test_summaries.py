"""Series summaries of the departments' objects, from index facts and a header (services/summaries.py)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from openpacs.services import summaries as S


def _ds(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_wsi_pyramid_counts_levels_tiles_and_magnification() -> None:
    path = _ds(ObjectiveLensPower=40)
    header = _ds(SOPClassUID=S.WSI, TotalPixelMatrixRows=50000, TotalPixelMatrixColumns=80000, OpticalPathSequence=[path])
    facts = S.SeriesFacts("SM", [(S.WSI, 61035, 256, 256), (S.WSI, 15300, 256, 256), (S.WSI, 3825, 256, 256)])
    out = S.summarize(facts, header)
    assert out == {"kind": "wsi", "icon": "WSI", "text": "WSI 40×, 3 levels, 80,160 tiles, 80,000×50,000 px"}
    assert S.needs_header(facts)


def test_nm_pet_video_and_cine() -> None:
    nm = S.summarize(S.SeriesFacts("NM", [(S.NM, 64, 128, 128)]),
                     _ds(EnergyWindowInformationSequence=[Dataset(), Dataset()], NumberOfDetectors=2))
    assert nm["text"] == "NM, 1 image, 64 frames, 2 energy windows, 2 detectors"
    pet = S.summarize(S.SeriesFacts("PT", [("1.2.840.10008.5.1.4.1.1.128", 1, 128, 128)] * 3),
                      _ds(Units="BQML", PatientWeight=70, RadiopharmaceuticalInformationSequence=[Dataset()]))
    assert pet == {"kind": "pet", "icon": "PET", "text": "PET, 3 slices, BQML, SUV"}
    video = S.summarize(S.SeriesFacts("ES", [("1.2.840.10008.5.1.4.1.1.77.1.1.1", 250, 480, 640)]), _ds(CineRate=25))
    assert video["text"] == "Endoscopy video, 10 s"
    xa = S.summarize(S.SeriesFacts("XA", [("1.2.840.10008.5.1.4.1.1.12.1", 40, 512, 512)] * 2), _ds(FrameTime=66.667))
    assert xa == {"kind": "cine", "icon": "CINE", "text": "2 × XA cine, 40 frames at 15 fps"}


def test_plain_images_need_no_header_and_unknown_headers_degrade() -> None:
    facts = S.SeriesFacts("CT", [("1.2.840.10008.5.1.4.1.1.2", 1, 512, 512)] * 120)
    assert not S.needs_header(facts)
    assert S.summarize(facts, None)["text"] == "CT, 120 images, 512×512"
    # an unreadable header: the kind and a generic text still come from the index
    ecg = S.summarize(S.SeriesFacts("ECG", [("1.2.840.10008.5.1.4.1.1.9.1.1", 1, None, None)]), None)
    assert ecg == {"kind": "ecg", "icon": "ECG", "text": "12-lead ECG"}
    assert S.kinds_of("1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.481.3", "CT\\RTSTRUCT") == ["rt"]
    assert S.kinds_of("", "PT\\CT") == ["pet"]
