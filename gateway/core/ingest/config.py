"""Settings of the photo ingest pipeline: defined in gateway/core/ingest_settings.py.

They live outside this package so the gateway context (gateway/core/context.py) can name them without
importing the pipeline, which itself uses the context, the consent writer and the policy.
"""

from gateway.core.ingest_settings import IngestSettings

__all__ = ["IngestSettings"]
