"""Errors that ssmq reports to users as one clear line (the CLI exits with code 2)."""


class SsmqError(Exception):
    """A user-facing error: bad input, a bad file, a bad option. Never a bug in ssmq."""


class CheckpointError(SsmqError):
    """A model or quantized-checkpoint directory that cannot be read as asked."""


class ConfigError(SsmqError):
    """A config that is missing, malformed, or describes an architecture ssmq does not support."""
