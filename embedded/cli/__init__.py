"""Command-line entry points: `python -m embedded.cli.demo` (`make demo`), `python -m embedded.cli.ui` (`make ui`)."""
