"""Turn an uploaded archive (or an S3 prefix) into a validated, immutable dataset.

`pipeline` reads the entries in two streaming passes, one in memory at a time, and writes
the canonical zip; `layout` and `manifest` say where each image's class and split come from;
`model` holds the limits and the report. None of these touch the object store or the
database: `register` stores the result (through `core.datasets`) only after the whole
archive has been checked.
"""

from service.ingest.images import IMAGE_EXTENSIONS, PIL_FORMATS
from service.ingest.model import MAX_LISTED, IngestReport, Limits
from service.ingest.pipeline import ingest_archive, ingest_s3_prefix

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_LISTED",
    "PIL_FORMATS",
    "IngestReport",
    "Limits",
    "ingest_archive",
    "ingest_s3_prefix",
]
