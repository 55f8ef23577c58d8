"""Row error codes: the stable part of every error row.

An error row's `error` column reads `<code>: <reason>`; its `error_code` column holds the
code alone. Codes are part of the output contract (filter on them, count them, alert on
them); reasons are for people and may change. Run manifests count error rows by code.
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # read: the bytes could not be had
    "read.not_found": "the object does not exist (not retried)",
    "read.forbidden": "no permission to read the object, or it is a directory (not retried)",
    "read.failed": "reading kept failing after `read_retries` attempts (network, service errors)",
    "read.bad_container": "a tar shard, Parquet file or Azure ML request file could not be read (the rest of it)",
    "read.no_image": "a container row with no image: empty image column, tar sample without an image member, "
                     "an Azure ML item that is neither base64 nor a URL",
    "read.bad_id": "a Parquet row whose id column is null or repeats an earlier row's (its id is then "
                   "<file>#<row>); a tar member name repeated in its shard, or a second passthrough member of one sample",
    # decode: the bytes are not an image we accept
    "decode.empty": "zero bytes",
    "decode.unsupported_format": "not an image in an allowed format (`formats`): HTML, PSD, EPS, FITS, random bytes, ...",
    "decode.unsupported_codec": "an allowed format using a compression this Pillow build cannot decode "
                                "(e.g. WebP-compressed TIFF); the reason names it",
    "decode.bomb": "declares more pixels than `max_image_pixels` (refused before any pixel is decoded)",
    "decode.truncated": "the image data ends early",
    "decode.corrupt": "the image data is damaged in another way (bad checksum, bad header, bad frame sequence, "
                      "impossible size, ...); the reason gives the decoder's words",
    "decode.no_pixels": "zero width or height",
    "decode.internal": "a failure in batchscore's own steps after the image decoded (a bug to report; "
                       "logged with its traceback)",
    # predict: the image decoded, the model's output for it is unusable
    "predict.nonfinite": "the model's output (logits or embedding) holds NaN or inf: an overflow (e.g. fp16 on a "
                         "GPU) or a broken checkpoint; no probs or embedding written",
    "internal": "an error text without a known code (a bug to report)",
}


def error(code: str, reason: str) -> str:
    """The `error` value of a row: `<code>: <reason>`."""
    if code not in CODES:
        raise ValueError(f"unknown error code {code!r}; expected one of {sorted(CODES)}")
    return f"{code}: {reason}"


def code_of(error_text: str | None) -> str | None:
    """The code of an `error` value (None for a row without error)."""
    if not error_text:
        return None
    code = error_text.split(":", 1)[0]
    return code if code in CODES else "internal"
