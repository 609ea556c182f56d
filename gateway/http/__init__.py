"""What every HTTP door shares (REST, FHIR, later DICOMweb and the viewer): who is calling (bearer token or API
key, purpose-of-use headers) and the table from the core's refusal kinds to HTTP statuses. Each door renders
its own error bodies (JSON detail, OperationOutcome, ...)."""
