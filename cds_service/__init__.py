"""CDS Hooks service for colorectal cancer metastases (lung and liver)."""

__version__ = "0.1.0"
