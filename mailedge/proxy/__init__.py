"""The PROXY protocol codec (v1 and v2), sans-IO: no trio, no sockets.

The public modules, each importing only those above it here: ``values`` (what a header
says), ``header`` (:class:`ProxyHeader`), ``errors``, ``parser`` (:func:`parse_header`
and its limits), ``sniff``, ``encoder`` (:func:`encode_v1`, :func:`encode_v2`) and
``build`` (:func:`build_header`). Underscored modules are private. ``__all__`` is theirs,
gathered.
"""

from __future__ import annotations

from mailedge.proxy import build, encoder, errors, header, parser, values
from mailedge.proxy import sniff as _sniff_module  # its name is also the function's
from mailedge.proxy.build import *  # noqa: F403
from mailedge.proxy.encoder import *  # noqa: F403
from mailedge.proxy.errors import *  # noqa: F403
from mailedge.proxy.header import *  # noqa: F403
from mailedge.proxy.parser import *  # noqa: F403
from mailedge.proxy.sniff import *  # noqa: F403
from mailedge.proxy.values import *  # noqa: F403

# parsing
__all__ = list(parser.__all__)
__all__ += _sniff_module.__all__
# encoding
__all__ += encoder.__all__
__all__ += build.__all__
# values
__all__ += header.__all__
__all__ += values.__all__
# errors
__all__ += errors.__all__
