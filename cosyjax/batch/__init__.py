"""Offline batch synthesis (``cosyjax batch``): a JSONL manifest in, ``<id>.wav`` files out, resumable,
over every local device and over hosts.  ``run_batch`` is the entry point; ``manifest`` has the line
contract, ``runner`` the scheduling and outputs, ``distributed`` the multi-process set-up."""

from cosyjax.batch.manifest import FIELDS, MODES, Entry, ManifestError, read_manifest
from cosyjax.batch.runner import (
    DEFAULT_BATCH_SIZE, SUBTYPES, BatchInterrupted, BatchSummary, plan_batches, run_batch, single_request,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "FIELDS", "MODES", "SUBTYPES", "BatchInterrupted", "BatchSummary", "Entry", "ManifestError",
    "plan_batches", "read_manifest", "run_batch", "single_request",
]
