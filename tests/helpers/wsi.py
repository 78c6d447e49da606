"""A deterministic synthetic VL Whole Slide Microscopy Image pyramid (PS3.3 A.32.8), for tests and bench/wsi_bench.py.

Each level is one TILED_FULL instance (JPEG baseline, 256x256 tiles, YBR_FULL_422) in one series; level 0 is the
highest resolution, each further level halves it. Every tile is the level's colour (LEVEL_COLORS) with a 64-pixel
checkerboard of a darker shade; the checker phase flips from tile to tile and a 16x16 block in the tile's top-left
corner encodes its column and row (grey values), so every tile of a level is distinct and a screenshot tells the level
apart by colour. ``sparse_instance`` builds one TILED_SPARSE instance (PerFrameFunctionalGroupsSequence with
PlanePositionSlideSequence) in its own series. The UIDs are derived from ``seed``, so the same call gives the same files.

Offset tables: ``offset_table`` "bot" (Basic Offset Table), "eot" (empty BOT + Extended Offset Table) or "none" (empty
BOT, fragments only: what the server has to index itself). ``distinct=False`` reuses a few encoded tiles per level
(fast for the 50,000-tile bench slide).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import JPEGBaseline8Bit, generate_uid

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
TILE = 256
# level 0 (full resolution) red, then green, blue, yellow, magenta, cyan, ...
LEVEL_COLORS: list[tuple[int, int, int]] = [
    (220, 40, 40),
    (40, 200, 40),
    (50, 60, 230),
    (230, 210, 30),
    (210, 40, 210),
    (30, 200, 210),
    (240, 140, 20),
    (150, 150, 150),
]
DARK = 0.55  # the checker squares' shade of the level colour
BASE_SPACING_MM = 0.00025  # 0.25 µm per pixel at level 0


def uid(seed: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def tile_pixels(level: int, col: int, row: int) -> np.ndarray:
    """The RGB pixels of tile (col, row) of ``level`` (before JPEG)."""
    color = np.array(LEVEL_COLORS[level % len(LEVEL_COLORS)], dtype=np.float32)
    y, x = np.mgrid[0:TILE, 0:TILE]
    checker = ((x // 64 + y // 64 + col + row) % 2).astype(bool)
    img = np.empty((TILE, TILE, 3), dtype=np.float32)
    img[:] = color
    img[checker] = color * DARK
    img[:16, :16] = (col * 37) % 256
    img[:16, 16:32] = (row * 37) % 256
    return img.astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality, subsampling=1)  # 4:2:2 = YBR_FULL_422
    return buf.getvalue()


@dataclass
class Level:
    level: int
    columns: int  # total pixel matrix
    rows: int

    @property
    def tiles_across(self) -> int:
        return -(-self.columns // TILE)

    @property
    def tiles_down(self) -> int:
        return -(-self.rows // TILE)

    @property
    def n_tiles(self) -> int:
        return self.tiles_across * self.tiles_down

    @property
    def spacing(self) -> float:
        return BASE_SPACING_MM * (2**self.level)


@dataclass
class Slide:
    seed: str = "openpacs-wsi"
    width: int = 2048  # level 0 total pixel matrix
    height: int = 1536
    n_levels: int = 4
    patient_id: str = "WSI-0001"
    patient_name: str = "Slide^Synthetic"
    distinct: bool = True
    quality: int = 90
    _tile_cache: dict[tuple[int, int, int], bytes] = field(default_factory=dict, repr=False)

    @property
    def study_uid(self) -> str:
        return uid(self.seed, "study")

    @property
    def series_uid(self) -> str:
        return uid(self.seed, "series")

    @property
    def frame_of_reference_uid(self) -> str:
        return uid(self.seed, "for")

    def sop_uid(self, level: int) -> str:
        return uid(self.seed, "instance", level)

    def levels(self) -> list[Level]:
        out = []
        for i in range(self.n_levels):
            f = 2**i
            out.append(Level(i, max(1, -(-self.width // f)), max(1, -(-self.height // f))))
        return out

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The JPEG bytes of one tile (what the server must send back for that frame, byte for byte)."""
        key = (level, col, row) if self.distinct else (level, (col + row) % 2, 0)
        data = self._tile_cache.get(key)
        if data is None:
            if self.distinct:
                data = encode_jpeg(tile_pixels(level, col, row), self.quality)
            else:
                data = encode_jpeg(tile_pixels(level, key[1], 0), self.quality)
            if len(data) & 1:
                data += b"\0"  # as encapsulated (fragments have an even length)
            if self.distinct and len(self._tile_cache) > 4096:
                self._tile_cache.clear()
            self._tile_cache[key] = data
        return data

    def level_tiles(self, level: Level) -> Iterator[bytes]:
        """TILED_FULL order: row by row, left to right (one focal plane, one optical path)."""
        for r in range(level.tiles_down):
            for c in range(level.tiles_across):
                yield self.tile(level.level, c, r)

    # -- datasets ---------------------------------------------------------------------------------------------------

    def _common(self, ds: Dataset, level: Level, sop_uid: str, series_uid: str, series_number: int) -> None:
        ds.SOPClassUID = WSI_SOP_CLASS
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = self.frame_of_reference_uid
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AcquisitionDateTime = "20260101120000"
        ds.StudyID = "WSI1"
        ds.AccessionNumber = "WSIACC1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic slide"
        ds.SeriesDescription = "Synthetic pyramid" if series_number == 1 else "Synthetic sparse tiles"
        ds.Modality = "SM"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = level.level + 1
        ds.Manufacturer = "OpenPACS tests"
        ds.ManufacturerModelName = "synthetic"
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = "1"
        ds.PositionReferenceIndicator = "SLIDE_CORNER"
        ds.ContainerIdentifier = "SLIDE-" + self.seed[-8:]
        ds.IssuerOfTheContainerIdentifierSequence = []
        ct = Dataset()
        ct.CodeValue = "433466003"
        ct.CodingSchemeDesignator = "SCT"
        ct.CodeMeaning = "Microscope slide"
        ds.ContainerTypeCodeSequence = [ct]
        spec = Dataset()
        spec.SpecimenIdentifier = "SPECIMEN-1"
        spec.SpecimenUID = uid(self.seed, "specimen")
        spec.IssuerOfTheSpecimenIdentifierSequence = []
        spec.SpecimenPreparationSequence = []
        ds.SpecimenDescriptionSequence = [spec]
        ds.VolumetricProperties = "VOLUME"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.Rows = TILE
        ds.Columns = TILE
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.BurnedInAnnotation = "NO"
        ds.SpecimenLabelInImage = "NO"
        ds.FocusMethod = "AUTO"
        ds.ExtendedDepthOfField = "NO"
        ds.TotalPixelMatrixColumns = level.columns
        ds.TotalPixelMatrixRows = level.rows
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfFocalPlanes = 1
        ds.NumberOfOpticalPaths = 1
        ds.ImagedVolumeWidth = round(self.width * BASE_SPACING_MM, 6)
        ds.ImagedVolumeHeight = round(self.height * BASE_SPACING_MM, 6)
        ds.ImagedVolumeDepth = 0.001
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 20.0
        origin.YOffsetInSlideCoordinateSystem = 40.0
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        path.OpticalPathDescription = "Brightfield"
        ill = Dataset()
        ill.CodeValue = "111744"
        ill.CodingSchemeDesignator = "DCM"
        ill.CodeMeaning = "Brightfield illumination"
        path.IlluminationTypeCodeSequence = [ill]
        color = Dataset()
        color.CodeValue = "11744"
        color.CodingSchemeDesignator = "DCM"
        color.CodeMeaning = "Full Spectrum"
        path.IlluminationColorCodeSequence = [color]
        ds.OpticalPathSequence = [path]
        measures = Dataset()
        measures.PixelSpacing = [level.spacing, level.spacing]
        measures.SliceThickness = 0.001
        measures.SpacingBetweenSlices = 0.001
        ftype = Dataset()
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        opid = Dataset()
        opid.OpticalPathIdentifier = "1"
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [ftype]
        shared.OpticalPathIdentificationSequence = [opid]
        ds.SharedFunctionalGroupsSequence = [shared]
        org = Dataset()
        org.DimensionOrganizationUID = uid(self.seed, "dimorg")
        ds.DimensionOrganizationSequence = [org]

    def _file_meta(self, ds: Dataset) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1341.1"
        ds.file_meta = meta
        ds.preamble = b"\0" * 128

    def level_dataset(self, level: Level, offset_table: str = "bot") -> Dataset:
        ds = Dataset()
        self._common(ds, level, self.sop_uid(level.level), self.series_uid, 1)
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.NumberOfFrames = level.n_tiles
        _set_pixel_data(ds, list(self.level_tiles(level)), offset_table)
        self._file_meta(ds)
        return ds

    def sparse_dataset(self, level_index: int | None = None) -> Dataset:
        """A TILED_SPARSE copy of one level (default: the second-coarsest), tiles listed in reverse order."""
        levels = self.levels()
        level = levels[level_index if level_index is not None else max(0, len(levels) - 2)]
        ds = Dataset()
        self._common(ds, level, uid(self.seed, "sparse", level.level), uid(self.seed, "sparse-series"), 2)
        ds.DimensionOrganizationType = "TILED_SPARSE"
        positions = [(c, r) for r in range(level.tiles_down) for c in range(level.tiles_across)][::-1]
        ds.NumberOfFrames = len(positions)
        per_frame = []
        for c, r in positions:
            pos = Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix = c * TILE + 1
            pos.RowPositionInTotalImagePixelMatrix = r * TILE + 1
            pos.XOffsetInSlideCoordinateSystem = round(20.0 - r * TILE * level.spacing, 6)
            pos.YOffsetInSlideCoordinateSystem = round(40.0 - c * TILE * level.spacing, 6)
            pos.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = [pos]
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = per_frame
        _set_pixel_data(ds, [self.tile(level.level, c, r) for c, r in positions], "bot")
        self._file_meta(ds)
        self.sparse_positions = positions
        return ds

    def write(self, directory: Path, offset_tables: dict[int, str] | None = None, sparse: bool = True) -> list[Path]:
        """Every level (and the sparse instance) as Part 10 files in ``directory``; level i as level-{i}.dcm."""
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for level in self.levels():
            p = directory / f"level-{level.level}.dcm"
            self.level_dataset(level, (offset_tables or {}).get(level.level, "bot")).save_as(p, enforce_file_format=True)
            files.append(p)
        if sparse:
            p = directory / "sparse.dcm"
            self.sparse_dataset().save_as(p, enforce_file_format=True)
            files.append(p)
        return files


def _set_pixel_data(ds: Dataset, frames: list[bytes], offset_table: str) -> None:
    if offset_table == "eot":
        data, offsets, lengths = encapsulate_extended(frames)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    elif offset_table == "bot":
        ds.PixelData = encapsulate(frames, has_bot=True)
    elif offset_table == "none":
        ds.PixelData = encapsulate(frames, has_bot=False)
    else:
        raise ValueError(f"offset_table must be bot, eot or none, not {offset_table!r}")
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def level_of(rgb: np.ndarray, n_levels: int = 4) -> int | None:
    """Which level's colour (the nearest, in either checker shade) a screenshot pixel has, or None for anything
    else (blank)."""
    best, level = 40.0, None
    for i, colour in enumerate(LEVEL_COLORS[:n_levels]):
        c = np.array(colour, dtype=np.float64)
        d = min(np.abs(rgb - c).max(), np.abs(rgb - c * DARK).max())
        if d < best:
            best, level = d, i
    return level


def levels_in(crop: np.ndarray, n_levels: int = 4) -> dict[int | None, float]:
    """The share of a sample of ``crop``'s pixels showing each level (None: no level, a blank or missing tile)."""
    px = crop.reshape(-1, 3)[::37]
    counts: dict[int | None, int] = {}
    for p in px:
        k = level_of(p, n_levels)
        counts[k] = counts.get(k, 0) + 1
    return {k: v / len(px) for k, v in counts.items()}


def write_big_slide(path: Path, seed: str = "openpacs-wsi-big", tiles_across: int = 224, tiles_down: int = 224,
                    offset_table: str = "none") -> Slide:
    """One TILED_FULL level of tiles_across x tiles_down tiles (224 x 224 = 50,176), written to ``path`` fragment by
    fragment (never held whole). The tiles repeat (distinct=False); frame n is still Slide.tile(0, col, row)."""
    slide = Slide(seed=seed, width=tiles_across * TILE, height=tiles_down * TILE, n_levels=1, distinct=False)
    level = slide.levels()[0]
    ds = Dataset()
    slide._common(ds, level, slide.sop_uid(0), slide.series_uid, 1)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfFrames = level.n_tiles
    slide._file_meta(ds)
    tiles = list(slide.level_tiles(level))
    if offset_table == "eot":
        offsets, pos = [], 8
        for t in tiles:
            offsets.append(pos - 8)
            pos += 8 + len(t) + (len(t) & 1)
        ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
        ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(tiles)}Q", *[len(t) + (len(t) & 1) for t in tiles])
    elif offset_table != "none":
        raise ValueError("write_big_slide: offset_table none or eot")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    with open(path, "wb") as f:  # the header, then Pixel Data (the last element) appended fragment by fragment
        f.write(raw)
        f.write(b"\xe0\x7f\x10\x00OB\0\0\xff\xff\xff\xff")
        f.write(b"\xfe\xff\x00\xe0\0\0\0\0")  # empty Basic Offset Table
        for t in tiles:
            if len(t) & 1:
                t = t + b"\0"
            f.write(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(t)))
            f.write(t)
        f.write(b"\xfe\xff\xdd\xe0\0\0\0\0")
    return slide
