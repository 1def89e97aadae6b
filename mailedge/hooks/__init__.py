"""Policy hooks fed by the connection context: rate limits, bans, SPF and DMARC.

The interface they implement lives in :mod:`mailedge.policy`, below the server that calls it;
it is re-exported here, where a hook's author looks for it.
"""

from __future__ import annotations

from mailedge.policy import *  # noqa: F403
from mailedge.policy import __all__ as __all__
