"""Object storage as a URI (`location`) and where a run's things live on it (`layout`)."""

from generalmodel.storage.layout import (
    ADAPTER_FILES,
    EXPORT_FILES,
    HF_PREFIX,
    RunLayout,
    download_export,
    source_name,
    trial_checkpoint_dir,
    under_root,
)
from generalmodel.storage.location import (
    MANIFEST,
    Location,
    StorageError,
    StorageFull,
    StorageUnavailable,
    check_bucket,
    publish_manifest,
    read_manifest,
    resolve,
    s3_filesystem,
    sha256_hex,
    with_retries,
)

__all__ = [
    "ADAPTER_FILES", "EXPORT_FILES", "HF_PREFIX", "MANIFEST", "Location", "RunLayout", "StorageError", "StorageFull",
    "StorageUnavailable", "check_bucket", "download_export", "publish_manifest", "read_manifest", "resolve",
    "s3_filesystem", "sha256_hex", "source_name", "trial_checkpoint_dir", "under_root", "with_retries",
]  # fmt: skip
