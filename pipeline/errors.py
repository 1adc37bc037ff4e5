"""User-facing errors: the CLI prints these as one paragraph (no traceback unless --debug) and exits 2."""


class HepregError(Exception):
    """A problem with the user's input, files or configuration, as opposed to a bug."""


class ConfigError(HepregError):
    """A config file or override that does not fit the schema."""


class DataError(HepregError):
    """An input dataset that does not follow the ATLAS-muon HDF5 layout; the message names file, event, field."""


class CacheError(HepregError):
    """A cache that is missing, incomplete, corrupted or made from another checkpoint."""
