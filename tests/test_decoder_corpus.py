"""Real decoder test files, scored in one pipeline run.

`tests/data/decoders/` holds 88 small files vendored from the test suites of the decoders
themselves (Pillow, PngSuite, bmpsuite, libjpeg-turbo, image-rs; sources, commits and
licences in its README.md): good images of every kind batchscore takes, damaged ones, and
files in formats it refuses by default. The test scores the whole folder in ONE run and
checks rows in = rows out (each file's id exactly once), that no row is `decode.internal`,
and each file's outcome against `EXPECTED`: "scored" or the error code a careful user
would want. The table states the intended behaviour, not whatever the decoder does today;
the comments say why where it is not obvious.
"""

from __future__ import annotations

import collections
from pathlib import Path

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.errors import CODES
from batchscore.outputs import output as sink

CORPUS = Path(__file__).resolve().parent / "data" / "decoders"
SCORED = "scored"

# Path under CORPUS -> the expected outcome: SCORED, an error code, or a tuple of the outcomes
# allowed where the right one depends on how Pillow was built.
EXPECTED: dict[str, str | tuple[str, ...]] = {
    # -- JPEG ------------------------------------------------------------------------------
    "pillow/hopper.jpg": SCORED,                    # baseline, 4:2:0
    "pillow/pil_sample_rgb.jpg": SCORED,            # baseline, 4:4:4
    "pillow/pil_sample_cmyk.jpg": SCORED,           # Adobe CMYK
    "pillow/hopper_gray.jpg": SCORED,               # greyscale
    "pillow/hopper_orientation_6.jpg": SCORED,      # EXIF orientation 6
    "jpeg-decoder/mozilla/jpg-progressive.jpg": SCORED,  # progressive (SOF2)
    "libjpeg-turbo/testimgari.jpg": SCORED,         # arithmetic coding (SOF9)
    # A valid 12-bit JPEG (SOF1, 12-bit samples) that Pillow cannot decode: a codec this build
    # lacks, not damaged data.
    "libjpeg-turbo/monkey12.jpg": "decode.unsupported_codec",
    "pillow/truncated_jpeg.jpg": "decode.truncated",  # progressive JPEG cut short
    # -- MPO (camera multi-picture JPEG): the first picture ---------------------------------
    "pillow/frame_size.mpo": SCORED,
    "pillow/ignore_frame_size.mpo": SCORED,
    # -- PNG: PngSuite's good files --------------------------------------------------------
    "pngsuite/basn0g01.png": SCORED,                # greyscale 1 bit
    "pngsuite/basn0g02.png": SCORED,                # greyscale 2 bit
    "pngsuite/basn0g04.png": SCORED,                # greyscale 4 bit
    "pngsuite/basn0g16.png": SCORED,                # greyscale 16 bit
    "pngsuite/basn2c16.png": SCORED,                # RGB 16 bit
    "pngsuite/basn3p08.png": SCORED,                # palette 8 bit
    "pngsuite/basn4a16.png": SCORED,                # greyscale + alpha 16 bit
    "pngsuite/basn6a08.png": SCORED,                # RGBA 8 bit
    "pngsuite/basi0g08.png": SCORED,                # interlaced (Adam7) greyscale
    "pngsuite/basi6a16.png": SCORED,                # interlaced RGBA 16 bit
    "pngsuite/g25n0g16.png": SCORED,                # gamma 2.5, greyscale 16 bit
    # -- PNG: PngSuite's deliberately corrupt files: every one is damaged -------------------
    # The signature files (xs*, xcr, xlf) carry an intact PNG after a damaged signature (the
    # IHDR chunk, with a valid CRC, at offset 8): damaged PNGs, so corrupt, not "not an image".
    # (libpng itself says "PNG file corrupted by ASCII conversion" for xs7, xcr and xlf.)
    "pngsuite/xs1n0g01.png": "decode.corrupt",      # signature byte 1 MSB reset (7-bit channel)
    "pngsuite/xs2n0g01.png": "decode.corrupt",      # signature byte 2 is 'Q'
    "pngsuite/xs4n0g01.png": "decode.corrupt",      # signature byte 4 lower case
    "pngsuite/xs7n0g01.png": "decode.corrupt",      # signature byte 7 a space, not ^Z
    "pngsuite/xcrn0g04.png": "decode.corrupt",      # LF -> CR LF (text-mode transfer)
    "pngsuite/xlfn0g04.png": "decode.corrupt",      # CR LF -> LF (text-mode transfer)
    "pngsuite/xhdn0g08.png": "decode.corrupt",      # bad IHDR CRC
    "pngsuite/xc1n0g08.png": "decode.corrupt",      # colour type 1
    "pngsuite/xc9n2c08.png": "decode.corrupt",      # colour type 9
    "pngsuite/xd0n2c08.png": "decode.corrupt",      # bit depth 0
    "pngsuite/xd3n2c08.png": "decode.corrupt",      # bit depth 3
    "pngsuite/xd9n2c08.png": "decode.corrupt",      # bit depth 99
    "pngsuite/xdtn0g01.png": "decode.corrupt",      # no IDAT chunk at all
    # Bad IDAT CRC. Pillow skips IDAT CRCs and decodes it; libpng treats a CRC error in a
    # critical chunk as fatal, and Pillow itself refuses a bad CRC before IDAT (xhdn0g08).
    "pngsuite/xcsn0g01.png": "decode.corrupt",
    # -- PNG: Pillow's --------------------------------------------------------------------
    "pillow/truncated_image.png": "decode.truncated",
    "pillow/broken_data_stream.png": "decode.corrupt",  # IDAT bad CRC and a bad zlib stream
    "pillow/broken.png": "decode.corrupt",          # signature, then binary garbage
    "pillow/padded_idat.png": SCORED,               # padding after the zlib stream (libpng: a warning)
    # Three zTXt chunks that inflate past Pillow's MAX_TEXT_CHUNK: a decompression DoS that
    # Pillow refuses by design; refusing it is right for a batch job.
    "pillow/png_decompression_dos.png": "decode.corrupt",
    # -- APNG --------------------------------------------------------------------------------
    "pillow/apng/single_frame.png": SCORED,
    "pillow/apng/dispose_op_previous.png": SCORED,  # 4 frames
    "pillow/apng/mode_16bit.png": SCORED,           # 16-bit RGBA frames
    # Broken animation chunks after an intact default image (IDAT). The APNG spec: "when any
    # error is encountered decoders should discard all subsequent frames, stop the animation,
    # and revert to displaying the default image". batchscore scores the default image, and
    # Pillow has decoded it completely before it meets the bad chunks (it warns "Invalid
    # APNG, will use default PNG image if possible"). So these are scored.
    "pillow/apng/sequence_gap.png": SCORED,         # fcTL/fdAT sequence numbers skip one
    "pillow/apng/sequence_reorder.png": SCORED,     # sequence numbers out of order
    "pillow/apng/chunk_no_fctl.png": SCORED,        # fdAT without its fcTL
    "pillow/apng/syntax_num_frames_zero.png": "decode.corrupt",  # acTL, then IEND: no image data at all
    # -- GIF ---------------------------------------------------------------------------------
    "pillow/hopper.gif": SCORED,
    "pillow/dispose_bgnd.gif": SCORED,              # animated, 5 frames
    "pillow/transparent.gif": SCORED,               # transparent palette entry
    "pillow/zero_width.gif": "decode.no_pixels",    # logical screen 0 wide
    "pillow/decompression_bomb.gif": "decode.bomb",  # declares 65535x66601 in 44 bytes
    # -- BMP (bmpsuite: g/ good, q/ questionable, b/ bad) ------------------------------------
    "pillow/bmp/g/pal1.bmp": SCORED,
    "pillow/bmp/g/pal4rle.bmp": SCORED,
    "pillow/bmp/g/pal8os2.bmp": SCORED,             # OS/2 header
    "pillow/bmp/g/rgb24.bmp": SCORED,
    # Valid BMPs in variants Pillow does not decode (Pillow's own suite lists g/rgb32bf as
    # unsupported): a missing codec, never "corrupt".
    "pillow/bmp/g/rgb32bf.bmp": "decode.unsupported_codec",  # 32-bit BI_BITFIELDS, unusual masks
    "pillow/bmp/q/rgb24png.bmp": "decode.unsupported_codec",  # BI_PNG: a PNG inside the BMP
    "pillow/bmp/q/pal2.bmp": "decode.unsupported_codec",      # 2 bits per pixel (Windows CE)
    "pillow/bmp/q/rgba32.bmp": SCORED,
    "pillow/bmp/b/badbitcount.bmp": "decode.corrupt",  # 30000 bits per pixel
    "pillow/bmp/b/badheadersize.bmp": "decode.corrupt",
    "pillow/bmp/b/badwidth.bmp": "decode.corrupt",  # negative width
    "pillow/bmp/b/reallybig.bmp": "decode.bomb",    # declares 3000000x2000000
    "pillow/bmp/b/shortfile.bmp": "decode.truncated",
    # -- TIFF --------------------------------------------------------------------------------
    "pillow/hopper_lzw.tif": SCORED,
    "pillow/16bit.deflate.tif": SCORED,             # greyscale 16 bit, deflate
    "pillow/tiff_16bit_RGB.tiff": SCORED,           # RGB 16 bit
    "pillow/hopper_jpg.tif": SCORED,                # JPEG-in-TIFF
    "pillow/multipage.tiff": SCORED,                # 3 pages
    "pillow/hopper_g4.tif": SCORED,                 # CCITT group 4, 1 bit
    # WebP-compressed TIFF: scored where Pillow's libtiff has WebP, a missing codec where not
    # (Pillow's wheels build libtiff without it).
    "pillow/hopper_webp.tif": (SCORED, "decode.unsupported_codec"),
    "pillow/libtiff_segfault.tif": "decode.corrupt",  # 65535 samples per pixel
    # -- WebP --------------------------------------------------------------------------------
    "pillow/hopper.webp": SCORED,                   # lossy (VP8)
    "pillow/transparent.webp": SCORED,              # lossy with alpha (VP8X)
    "image-webp/regression/lossless_indexed_1bit_palette.webp": SCORED,  # lossless (VP8L)
    "image-webp/animated/random_lossy.webp": SCORED,  # animated, 4 frames
    # -- AVIF and HEIF -----------------------------------------------------------------------
    "pillow/avif/hopper.avif": SCORED,
    "pillow/avif/transparency.avif": SCORED,
    "pillow/avif/star.avifs": SCORED,               # animated AVIF (image sequence)
    "pillow/avif/hopper.heif": SCORED,              # HEIF (read through pillow-heif)
    # -- formats known but not allowed by default, damaged or not ----------------------------
    "pillow/rgba.psd": "decode.unsupported_format",
    "pillow/hopper_1bit.pbm": "decode.unsupported_format",
    "pillow/negative_size.ppm": "decode.unsupported_format",  # a broken PPM is still a PPM
    "pillow/hopper.ico": "decode.unsupported_format",
    "pillow/la.tga": "decode.unsupported_format",
    "pillow/00r0_gray_l.jp2": "decode.unsupported_format",
}


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "README.md")


def test_the_table_names_every_vendored_file_with_known_codes():
    names = {p.relative_to(CORPUS).as_posix() for p in corpus_files()}
    assert names == set(EXPECTED), {"not in EXPECTED": sorted(names - set(EXPECTED)),
                                    "missing from the folder": sorted(set(EXPECTED) - names)}
    outcomes = {o for want in EXPECTED.values() for o in (want if isinstance(want, tuple) else (want,))}
    assert outcomes - {SCORED} <= set(CODES), sorted(outcomes - {SCORED} - set(CODES))
    assert sum(p.stat().st_size for p in corpus_files()) < 1_500_000


def test_decoder_corpus_in_one_run(ray_session, tmp_path):
    files = corpus_files()
    name_of = {str(p): p.relative_to(CORPUS).as_posix() for p in files}
    endings = tuple(sorted({p.suffix.lower() for p in files}))  # every file is listed
    output = tmp_path / "out"
    result = pipeline.score(ScoreConfig(input=(str(CORPUS),), output=str(output), input_format="files",
                                        extensions=endings, max_error_fraction=1.0))
    rows = sink.read_committed(str(output)).to_pylist()

    ids = [r["id"] for r in rows]  # rows out = rows in, each file exactly once
    duplicated = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicated, duplicated
    assert set(ids) == set(name_of), {"missing": sorted(set(name_of) - set(ids)),
                                      "extra": sorted(set(ids) - set(name_of))}
    assert len(rows) == len(files) == result.rows

    internal = {name_of[r["id"]]: r["error"] for r in rows if r["error_code"] in ("decode.internal", "internal")}
    assert not internal, internal

    outcomes, wrong = {}, {}
    for r in rows:
        name = name_of[r["id"]]
        if r["error"] is None:
            outcomes[name] = SCORED
            labels, probs = r["labels"], r["probs"]
            assert r["error_code"] is None and labels and len(labels) == len(probs), (name, r)
            assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-4, (name, probs)
            assert list(probs) == sorted(probs, reverse=True), (name, probs)
        else:
            outcomes[name] = r["error_code"]
            assert r["labels"] is None and r["probs"] is None, (name, r)
            reason = r["error"].removeprefix(f"{r['error_code']}: ")
            assert reason != r["error"] and reason.strip(), (name, r)  # `<code>: <reason>`
        want = EXPECTED[name]
        if outcomes[name] not in (want if isinstance(want, tuple) else (want,)):
            wrong[name] = f"expected {want}, got {outcomes[name]}" + (f" ({r['error']})" if r["error"] else "")

    counts = collections.Counter(outcomes.values())
    assert result.errors_by_code == {c: n for c, n in counts.items() if c != SCORED}
    print(f"FIGURE decoder corpus: {len(files)} files in, {len(rows)} rows out, {counts[SCORED]} scored, "
          f"errors {dict(sorted((c, n) for c, n in counts.items() if c != SCORED))}; "
          f"{len(wrong)} not as expected; {result.images_per_second:.1f} images/s")
    assert not wrong, "\n" + "\n".join(f"{name}: {why}" for name, why in sorted(wrong.items()))
