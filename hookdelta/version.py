"""The package version, in a module of its own so any part can read it without a cycle."""

VERSION = "0.3.0"
