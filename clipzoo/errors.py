"""Exception types: every user-facing failure is one of these, with a one-line message."""


class ClipzooError(Exception):
    """Base class: the message names the problem and the fix."""


class BackboneError(ClipzooError):
    """The backbone cannot be loaded, or an expert belongs to another backbone."""


class DataError(ClipzooError):
    """A task's data is missing, empty or unreadable."""


class ConfigError(ClipzooError):
    """A setting is invalid (unknown kind, bad rank, bad name...)."""


class RegistryError(ClipzooError):
    """The zoo directory or its registry is missing, corrupt or in conflict."""


class IntegrityError(ClipzooError):
    """A file's hash does not match the registry."""


class HubError(ClipzooError):
    """A Hub push or pull failed; the local zoo is unchanged."""
