"""Command-line entry points: `python -m embedded.cli.demo` (`make demo`), `python -m embedded.cli.ui` (`make ui`),
`python -m embedded.cli.upload_dataset` (`make upload-dataset`, against a running `make ui`)."""
