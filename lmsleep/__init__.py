"""The `lmsleep` command line (click). Every command is a thin wrapper over a library function."""
