"""fgtrac: sample-level traceability for ML pipelines."""
