"""Every exception hookdelta raises on bad input: one class per kind of mistake.

Each subclasses a builtin (ValueError, TypeError, RuntimeError) as well, so code that
already catches those keeps working.
"""

from __future__ import annotations


class HookdeltaError(Exception):
    """Base class of every hookdelta error."""


class ConfigError(HookdeltaError, ValueError):
    """A config field has a bad value; the message names the field and the allowed values."""


class SelectorError(HookdeltaError, ValueError):
    """A target selector matched nothing; the message lists the closest module names."""


class UnsupportedModuleError(HookdeltaError, TypeError):
    """A selector hit a module (or parameter) the delta method cannot adapt."""


class DeltaStateError(HookdeltaError, RuntimeError):
    """An operation does not fit the delta's current state (detached, merged, name taken...)."""


class MergeError(HookdeltaError, RuntimeError):
    """Merging would write non-finite values, or the method cannot be merged."""


class RoutingError(HookdeltaError, ValueError):
    """hd.route(...)'s rows do not fit the batch, or a routed layer does not see the batch."""


class DeltaFileError(HookdeltaError, ValueError):
    """A saved delta is missing, corrupt, of an unknown format, or does not fit the model."""


class BaseWeightsMismatchWarning(UserWarning):
    """A delta is loaded onto base weights that differ from the ones it was saved with."""


class BypassError(UnsupportedModuleError):
    """A delta's layer had its weight used without its forward being called (its parent, or a
    fused loss, reads the weight itself), so the delta's hooks there never ran for that use.
    Raised by the first forward that shows it and by every later one while the delta acts there."""


class PathPrefixWarning(UserWarning):
    """A saved delta's module paths were matched to the model's through a wrapper prefix."""
