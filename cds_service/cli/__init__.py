"""The `cds-service` command (console script `cds_service.cli:main`, or `python -m cds_service.cli`)."""

from cds_service.cli.main import main

__all__ = ["main"]
