"""Reading and validating manifests (CSV, JSONL) before anything is spent."""
