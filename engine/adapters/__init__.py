"""Adapter files: readers that turn each tool's on-disk layout into one normalized form."""
