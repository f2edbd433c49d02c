"""Errors medseg raises on purpose: each carries a message a user can act on.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base of every expected failure (bad input, unreachable storage, missing dataset)."""


class StorageError(MedsegError):
    """An object-store operation failed; the message names the endpoint and the key."""


class ObjectNotFound(StorageError):
    """The key (or local file) does not exist."""


class BucketNotFound(StorageError):
    """The bucket does not exist on the endpoint."""


class AccessDenied(StorageError):
    """The credentials were refused for this bucket or key."""


class EndpointUnreachable(StorageError):
    """The endpoint did not answer within the retry deadline."""


class ChecksumMismatch(StorageError):
    """The bytes read do not hash to the sha256 recorded when they were written."""


class DatasetError(MedsegError):
    """A dataset (source folder, manifest or version) is missing or unusable."""


class InvalidInput(MedsegError, ValueError):
    """A value given by the user is malformed: a URI, a name, a label convention, a config.

    Also a :class:`ValueError`, so code that validates values keeps catching it.
    """


class InvalidName(MedsegError):
    """A dataset, model, run or case name breaks the naming rule of :mod:`medseg.core.names`."""


class DiskFull(StorageError):
    """A local folder has no room for a file; the message names the folder and the space needed."""


class InputError(MedsegError):
    """An input (a request, or a file in it) that cannot be accepted; the message says why.

    The model server answers it with a 400 (gRPC ``INVALID_ARGUMENT``).
    """
