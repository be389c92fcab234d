"""Errors the CLI turns into one readable line (a traceback only with --debug)."""


class ToolkitError(Exception):
    """Base class: the message says what was expected, what was found, and what to do next."""


class ConfigError(ToolkitError):
    """A configuration file, preset or --set override is wrong."""


class DataError(ToolkitError):
    """An input corpus or data file is malformed."""


class ArtifactError(ToolkitError):
    """A stage folder is missing, incomplete or would be overwritten."""


class ExternalToolError(ToolkitError):
    """An external program or service (llama.cpp, Ollama, a subprocess) failed or is unreachable."""
