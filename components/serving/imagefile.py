"""Encoded image files checked as files, before PIL parses them: what would cost PIL's Python
parsers far more than a real file does, and what PIL would decode although the file is broken
(PIL fills missing PNG rows with black, clips PNM samples, and checks no PNG CRC once the image
data starts). Each check is a pure function of the bytes; it returns why the file is refused, or
None. components/serving/protocol.py calls them and answers the refusal as a 400.

Not checkable here: a JPEG's entropy-coded data. libjpeg only warns about corrupt or missing data
(filling the gap with grey), and Pillow drops its warnings (JpegDecode.c).
"""

from __future__ import annotations

import binascii
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------- EXIF
# PIL parses each entry of a TIFF directory (EXIF's first, a JPEG's MPF index) in Python (~1.4 us,
# twice that for one that points past the end): 5,459 of them fit in 64 KB, and 64 such images held
# a worker for 1.5 s. A camera writes tens.
MAX_EXIF_ENTRIES = 256
EXIF_PREFIX = b"Exif\0\0"                  # PIL's, before a PNG's eXIf bytes


def exif_entries(exif: bytes) -> int:
    """How many entries the first directory (IFD0) of an EXIF block (or any TIFF-structured block)
    declares (0 if it has none readable): what PIL parses, one by one in Python."""
    tiff = exif[len(EXIF_PREFIX):] if exif.startswith(EXIF_PREFIX) else exif
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 0
    order = "little" if tiff[:2] == b"II" else "big"
    offset = int.from_bytes(tiff[4:8], order)
    return int.from_bytes(tiff[offset:offset + 2], order) if offset + 2 <= len(tiff) else 0


# ---------------------------------------------------------------------------------------- JPEG
JPEG_SOI = b"\xff\xd8\xff"                # a JPEG's first bytes, also an MPO's (PIL's JPEG with a picture index)
JPEG_SOS = b"\xff\xda"                    # start of scan: never inside entropy-coded data (0xFF is stuffed)
# Bytes before a JPEG's first scan that belong to no segment (fill 0xFF, 0xFF00 pairs, junk): PIL's
# header parser steps through them one at a time in Python (a megabyte of fill: 635 ms).
MAX_JPEG_JUNK = 4096
MAX_JPEG_SEGMENTS = 1024                   # a camera's JPEG has tens (175,000 APPn segments: 0.41 s)
JPEG_FILL = re.compile(rb"\xff+")
# Markers PIL reads without a length field (its MARKER table: no handler), so a walk that read a length
# after one would skip what PIL parses: JPG (0xC8), RSTn, SOI, EOI, JPGn (0xF0-0xFD); 0x00 and 0x01 are
# stuffing and TEM.
JPEG_NO_LENGTH = frozenset({0x00, 0x01, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
# A JPEG's APP2 "MPF" segment (a multi-picture index, as an MPO's) is a TIFF directory that PIL parses
# entry by entry when it opens the file: 64 JPEGs of 5,455 entries each held a worker for 2.5 s. It
# has MAX_EXIF_ENTRIES at most, as EXIF's first directory (a camera's MPO has about 3).
JPEG_MPF = b"MPF\0"


def jpeg_header_problem(data: bytes) -> str | None:
    """Why a JPEG's header (up to its first scan) would cost PIL's Python parser more than a real
    camera's, or None: more than :data:`MAX_JPEG_JUNK` bytes that belong to no segment (fill 0xFF,
    0xFF00 pairs, junk), more than :data:`MAX_JPEG_SEGMENTS` segments, or an MPF directory of more
    than :data:`MAX_EXIF_ENTRIES` entries. Walks the segments by their lengths and stops at the
    first excess, so it costs at most a few thousand steps."""
    pos, junk, segments, end = 2, 0, 0, len(data)
    while pos < end - 1 and junk <= MAX_JPEG_JUNK:
        if data[pos] != 0xFF:                        # junk: up to the next 0xFF
            following = data.find(b"\xff", pos)
            following = end if following < 0 else following
            junk, pos = junk + following - pos, following
            continue
        last = JPEG_FILL.match(data, pos).end() - 1  # fill bytes: the last 0xFF starts the marker
        junk, pos = junk + last - pos, last
        if pos + 1 >= end or data[pos + 1] == 0xDA:  # start of scan: the header ends
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"a JPEG with more than {MAX_JPEG_SEGMENTS} segments before its first scan"
        marker = data[pos + 1]
        if marker in JPEG_NO_LENGTH:
            junk += 2 * (marker == 0x00)
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE2 and data[pos + 4:pos + 8] == JPEG_MPF:          # PIL parses it as it opens the file
            if (entries := exif_entries(data[pos + 8:pos + 2 + length])) > MAX_EXIF_ENTRIES:
                return (f"a JPEG whose MPF (multi-picture) directory has {entries} entries; at most "
                        f"{MAX_EXIF_ENTRIES}")
        pos += 2 + length
    if junk > MAX_JPEG_JUNK:
        return (f"a JPEG with more than {MAX_JPEG_JUNK} bytes outside its header segments before its first scan "
                "(fill bytes or junk)")
    return None


# ----------------------------------------------------------------------------------------- PNG
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL's PNG parser handles each chunk in Python (480,000 empty chunks: 1.4 s) and inflates every
# iCCP, zTXt and iTXt chunk, keeping the text (63 zTXt chunks of 1 MB each in each of 64 tiny PNGs
# held 4 GB). A PNG may have at most MAX_PNG_CHUNKS chunks besides its image data (IDAT), and
# MAX_PNG_INFLATED of them compressed.
MAX_PNG_CHUNKS = 256
MAX_PNG_INFLATED = 8
PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")    # a decoder must refuse any other critical chunk
PNG_ONCE = (b"IHDR", b"PLTE", b"tRNS", b"acTL")           # at most one of each (IHDR: the first chunk)
PNG_BEFORE_IMAGE_DATA = (b"PLTE", b"tRNS", b"acTL")
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}          # by colour type: grey, RGB, palette, grey+alpha, RGBA
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7: (first column, first row, column step, row step) of each of the seven passes
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
INFLATE_STEP = 1 << 20                     # bytes of image data inflated at a time when counting it


@dataclass
class PngWalk:
    """What :func:`png_chunks` read of a PNG: how many chunks, why it is refused (or None), and,
    for :func:`png_data_problem`, its image data chunks and the bytes they must inflate to."""
    chunks: int
    problem: str | None = None
    idats: list[memoryview] = field(default_factory=list)
    raw_size: int = 0
    size: tuple[int, int] = (0, 0)


def png_chunks(data: bytes, most: int) -> PngWalk:
    """Walks a PNG's chunks by their lengths, stopping at the first problem or after ``most``
    chunks (the caller's budget refuses more). Refused: a first chunk that is not IHDR; a chunk cut
    short, not named in ASCII letters, or failing its CRC (PIL checks none once the image data
    starts, and a bad one before it reads as "not a PNG"); an unknown critical chunk; an IEND with
    data; no IEND; more than :data:`MAX_PNG_CHUNKS` chunks besides its image data or
    :data:`MAX_PNG_INFLATED` compressed ones; what :func:`png_structure` refuses. What follows IEND
    is not read, by PIL either. The CRCs of an 8 MB PNG take ~1.5 ms. The image data is inflated
    later (:func:`png_data_problem`), once the caller has checked the image's size."""
    pos, total, other, inflated, end = len(PNG_SIGNATURE), 0, 0, 0, len(data)
    view, chunks, seen = memoryview(data), [], set()
    while total < most:
        if pos + 12 > end:
            return PngWalk(total, f"a PNG cut short after {total} chunks, without its IEND chunk (a truncated file?)")
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        name, crc_at = kind.decode("latin-1"), pos + 8 + length
        problem = None
        if not kind.isalpha() or not kind.isascii():
            problem = f"a PNG whose chunk {total + 1} is named {name!r}, not in ASCII letters (a corrupt file?)"
        elif total == 0 and kind != b"IHDR":
            problem = f"a PNG whose first chunk is {name}, not IHDR (a corrupt file?)"
        elif crc_at + 4 > end:
            problem = f"a PNG cut short: its {name} chunk runs past the end of the data (a truncated file?)"
        elif binascii.crc32(view[pos + 4:crc_at]) != int.from_bytes(data[crc_at:crc_at + 4], "big"):
            problem = f"a PNG whose {name} chunk (number {total + 1}) fails its CRC (a corrupt file)"
        elif kind[:1].isupper() and kind not in PNG_CRITICAL:
            problem = f"a PNG with an unknown critical chunk {name} (a decoder must refuse it)"
        elif kind == b"IEND" and length:
            problem = f"a PNG whose IEND chunk holds {length} bytes; it holds none"
        elif kind in PNG_ONCE and kind in seen:
            problem = f"a PNG with a second {name} chunk (PIL would read one, this check the other)"
        elif kind in PNG_BEFORE_IMAGE_DATA and b"IDAT" in seen:
            problem = f"a PNG whose {name} chunk comes after its image data"
        if problem is not None:
            return PngWalk(total, problem)
        total += 1
        chunks.append((kind, view[pos + 8:crc_at]))
        seen.add(kind)
        if kind != b"IDAT":
            other += 1
            inflated += kind in (b"iCCP", b"zTXt", b"iTXt")
            if other > MAX_PNG_CHUNKS:
                return PngWalk(total, f"a PNG with more than {MAX_PNG_CHUNKS} chunks besides its image data "
                                      "(an animation? send one frame)")
            if inflated > MAX_PNG_INFLATED:
                return PngWalk(total, f"a PNG with more than {MAX_PNG_INFLATED} compressed chunks (iCCP, zTXt, "
                                      "iTXt)")
            if kind == b"IEND":
                return png_structure(total, chunks)
        pos = crc_at + 4
    return PngWalk(total)


def png_structure(total: int, chunks: list[tuple[bytes, memoryview]]) -> PngWalk:
    """The walk of a PNG whose ``total`` chunks (kind, data) are each intact, refused if the file is
    still not valid: an IHDR that is not 13 bytes, gives a side of 0 or past 2^31 - 1, or names an
    undefined compression method; a palette image without a palette, or a palette where the PNG
    specification forbids one (grey) or of the wrong length; a tRNS chunk where alpha is already
    stored, before the palette, or of the wrong length; an APNG whose frame count is not its frames';
    no image data. (A second IHDR, PLTE, tRNS or acTL, or one of the last three after the image
    data, is refused by the walk: PIL reads the last one, this check the first.)
    Bit depth and colour type, filter and interlace methods PIL checks."""
    ihdr = chunks[0][1]
    if len(ihdr) != 13:
        return PngWalk(total, f"a PNG whose IHDR chunk is {len(ihdr)} bytes, not 13")
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, colour, compression, interlace = ihdr[8], ihdr[9], ihdr[10], ihdr[12]
    kinds = [kind for kind, _ in chunks]
    once = dict(chunk for chunk in chunks if chunk[0] in PNG_ONCE)     # the walk let one of each through
    plte, trns, actl = once.get(b"PLTE"), once.get(b"tRNS"), once.get(b"acTL")
    frames = int.from_bytes(actl[0:4], "big") if actl is not None and len(actl) == 8 else -1
    problem = None
    if not (0 < width < 1 << 31 and 0 < height < 1 << 31):
        problem = f"a PNG whose IHDR gives a size of {width}x{height}; each side is 1 to 2^31 - 1"
    elif compression != 0:
        problem = f"a PNG whose IHDR names compression method {compression}; only 0 (deflate) is defined"
    elif depth not in PNG_DEPTHS.get(colour, ()):
        return PngWalk(total)                   # PIL refuses it, naming the mode
    elif plte is None and colour == 3:
        problem = "a palette PNG (colour type 3) without its PLTE chunk"
    elif plte is not None and colour in (0, 4):
        problem = f"a greyscale PNG (colour type {colour}) with a PLTE chunk, which the PNG specification forbids"
    elif plte is not None and (len(plte) % 3 or not 3 <= len(plte) <= 3 * 256):
        problem = f"a PNG whose PLTE chunk is {len(plte)} bytes: 3 per entry, 1 to 256 entries"
    elif trns is not None and colour in (4, 6):
        problem = f"a PNG with an alpha channel (colour type {colour}) and a tRNS chunk, forbidden there"
    elif trns is not None and colour == 3 and kinds.index(b"tRNS") < kinds.index(b"PLTE"):
        problem = "a palette PNG whose tRNS chunk comes before its PLTE chunk"
    elif trns is not None and (colour == 0 and len(trns) != 2 or colour == 2 and len(trns) != 6
                               or colour == 3 and len(trns) > len(plte) // 3):
        problem = f"a PNG whose tRNS chunk is {len(trns)} bytes, the wrong length for its colour type {colour}"
    elif actl is not None and frames != kinds.count(b"fcTL"):
        problem = f"an APNG whose acTL chunk declares {frames} frames and holds {kinds.count(b'fcTL')}"
    elif b"IDAT" not in kinds:
        problem = "a PNG without image data (no IDAT chunk)"
    if problem is not None:
        return PngWalk(total, problem)
    return PngWalk(total, idats=[data for kind, data in chunks if kind == b"IDAT"], size=(width, height),
                   raw_size=png_raw_size(width, height, depth * PNG_CHANNELS[colour], interlace))


def png_raw_size(width: int, height: int, bits_per_pixel: int, interlace: int) -> int:
    """The bytes a PNG's image data inflates to: each row of each pass (one, or Adam7's seven) is a
    filter byte then its pixels, padded to a byte."""
    def rows(w, h):
        return h * (1 + (w * bits_per_pixel + 7) // 8) if w and h else 0
    if interlace != 1:
        return rows(width, height)
    return sum(rows(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in ADAM7)


def png_data_problem(walk: PngWalk) -> str | None:
    """Why a PNG's image data (its IDAT chunks' data, in order) is not one zlib stream of exactly
    the bytes its header's rows need, or None (also None for a walk that did not get that far).
    PIL fills the rows of a short stream with black and ignores what follows the stream's end;
    libpng refuses both ("Not enough image data", "Too much image data"). Inflates in steps of
    :data:`INFLATE_STEP`, keeping nothing, and stops at the first byte too many. Call it once the
    image's size is known to be within the limits: it costs what inflating that many bytes costs."""
    if not walk.idats:
        return None
    idats, expected, (width, height) = walk.idats, walk.raw_size, walk.size
    stream, produced = zlib.decompressobj(), 0
    try:
        for i, data in enumerate(idats):
            while data:
                produced += len(stream.decompress(data, INFLATE_STEP))
                if produced > expected:
                    return (f"a PNG whose image data inflates to more than the {expected} bytes its {width}x{height} "
                            "header needs")
                if stream.eof:
                    if stream.unused_data or any(idats[i + 1:]):
                        return "a PNG with data after the end of its image data's zlib stream"
                    break
                data = stream.unconsumed_tail
    except zlib.error as e:
        return f"a PNG whose image data is not a valid zlib stream ({e})"
    if not stream.eof:
        return "a PNG whose image data's zlib stream is cut short (a truncated file?)"
    if produced < expected:
        return (f"a PNG whose image data inflates to {produced} bytes where its {width}x{height} header needs "
                f"{expected} (rows missing)")
    return None


# ----------------------------------------------------------------------------------------- PNM
# A PNM's header (magic, width, height, maxval) is read by PIL a byte at a time in Python (~190 ns a
# byte): a 1x1 PPM with 8 MB of comment took 1.4 s. It must end within MAX_PNM_HEADER bytes, and be
# what the Netpbm formats define: P4 (bitmap), P5 (grey), P6 (RGB), then decimal numbers, each
# ended by whitespace, with comments between them (PIL also reads its own "Py"/"P0" types, any text
# Python's int() takes: "+8", "0_8", and a number whose digits a comment splits: "2#c\n55").
MAX_PNM_HEADER = 1024
PNM_SPACE = rb"[ \t\n\r\x0b\x0c]"
PNM_COMMENTS = rb"(?:#[^\r\n]*[\r\n])*"
# PIL reads a number's digits, skipping any comment (through its end of line), up to a whitespace
PNM_NUMBER = rb"([0-9]{1,10})" + PNM_COMMENTS + PNM_SPACE
PNM_GAP = rb"(?:%s|#[^\r\n]*[\r\n])*" % PNM_SPACE        # before a number: whitespace and comments
PNM_HEADER = re.compile(rb"(P4)%s%s%s%s|(P[56])%s%s%s%s%s%s" % (
    PNM_SPACE + PNM_GAP, PNM_NUMBER, PNM_GAP, PNM_NUMBER,
    PNM_SPACE + PNM_GAP, PNM_NUMBER, PNM_GAP, PNM_NUMBER, PNM_GAP, PNM_NUMBER))
PNM_MAGIC = re.compile(rb"P[0-9fy]")       # what PIL's PPM plugin tries to read


def pnm_problem(data: bytes) -> str | None:
    """Why bytes that PIL would read as a PBM/PGM/PPM are refused, or None: a plain (ASCII) type
    (PIL reads their comments in quadratic time: 600 KB took 2 s), a float PFM, any other type but
    P4/P5/P6, a header that is not decimal numbers or does not end within :data:`MAX_PNM_HEADER`
    bytes, and a sample above the header's maxval (PIL clips it silently)."""
    if not PNM_MAGIC.match(data):
        return None
    if data[:2] in (b"P1", b"P2", b"P3"):
        return "a plain (ASCII) PBM/PGM/PPM image; send it binary (P4/P5/P6), or as PNG or JPEG"
    if data[:2] in (b"Pf", b"PF"):
        return "a floating-point PFM image; send an 8- or 16-bit PNG, JPEG or PPM"
    if data[:2] not in (b"P4", b"P5", b"P6"):
        magic = data[:6].split()[0].decode("latin-1")
        return f"a {magic!r} image, not a Netpbm type this server reads; send P4, P5 or P6"
    header = PNM_HEADER.match(data, 0, MAX_PNM_HEADER)
    if header is None:
        return (f"a PBM/PGM/PPM whose header is not its type then width, height and maxval (none for P4) as "
                f"decimal numbers, each ended by whitespace, ending within its first {MAX_PNM_HEADER} bytes")
    if header[1]:                                  # a bitmap: no maxval, every bit is a pixel
        width, height, maxval = int(header[2]), int(header[3]), None
    else:
        width, height, maxval = int(header[5]), int(header[6]), int(header[7])
    if not width or not height:
        return f"a PBM/PGM/PPM of {width}x{height} pixels"
    if maxval is None or maxval in (255, 65535) or not 0 < maxval < 65536:
        return None                                # every sample fits; PIL refuses maxval 0 and > 65535
    samples = width * height * (3 if header[4] == b"P6" else 1)
    dtype = np.dtype(np.uint8 if maxval < 256 else ">u2")
    raster = memoryview(data)[header.end():]
    if samples * dtype.itemsize > len(raster):
        return None                                # PIL says it is truncated
    largest = int(np.frombuffer(raster, dtype, samples).max(initial=0))
    if largest > maxval:
        return f"a PGM/PPM with a sample of {largest} above its maxval {maxval}"
    return None
