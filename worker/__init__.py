"""inferq workers: keep one GGUF model loaded and run infer jobs from RQ."""
