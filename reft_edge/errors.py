"""The exception hierarchy shared by all stages (pure Python, no heavy imports).

Every error a user can cause is a ``ReftEdgeError``; its message is one line that
says what was wrong, where, and how to fix it. The CLI prints it and exits 2.
"""


class ReftEdgeError(Exception):
    """Base class: an error the user can fix (bad input, missing file, wrong option)."""


class UsageError(ReftEdgeError):
    """An option or argument has a value that cannot work."""


class DataError(ReftEdgeError):
    """A training data file cannot be read or a line is malformed (message has file:line)."""


class ModelError(ReftEdgeError):
    """The backbone cannot be loaded or is not supported."""


class PatchError(ReftEdgeError):
    """A patch file is at fault."""


class PatchFormatError(PatchError):
    """The patch is unreadable, damaged, has a wrong digest, non-finite values or bad shapes."""


class BackboneMismatchError(PatchError):
    """The patch was trained on another base model (fingerprints differ)."""


class PatchCompatibilityError(PatchError):
    """The patch targets layers or a hidden size the bundle does not offer."""


class ForeignPatchError(PatchError):
    """A pyreft folder or llama.cpp control vector cannot be imported (missing, damaged, untranslatable)."""


class BundleError(ReftEdgeError):
    """An exported bundle folder is missing a file or holds a damaged one."""


class ExportError(ReftEdgeError):
    """Export failed, e.g. the exported graph did not match the torch model."""
