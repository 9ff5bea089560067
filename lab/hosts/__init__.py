"""The multi-host lab: hosts as network namespaces, reached over SSH."""
