"""capsctl: capsule networks you can train, compare, export and look inside.

This package is backend-neutral: it imports numpy and the standard library only at
module level. Framework code lives in the `capsctl_torch` and `capsctl_keras` packages
and is imported inside the commands that need it.
"""

__version__ = "0.1.0"
