"""Dataset versions in S3: what a complete version is, its identity, and watching for new ones."""
