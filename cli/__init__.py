"""The command line: `seedream-batch` and its commands, on top of every other layer."""
