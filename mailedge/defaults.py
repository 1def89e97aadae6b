"""Every setting's default and bounds, each with the reason it has that value.

:mod:`mailedge.settings` validates against these, :mod:`mailedge.config` names them in its
messages, and docs/configuration.md quotes them. The clients' IPv6 prefix and the NAT64
prefix length live with the rules they shape, in :mod:`mailedge.clients`.
"""

from __future__ import annotations

from mailedge.clients import DEFAULT_IPV6_PREFIX, NAT64_PREFIX_LENGTH

__all__ = [
    "DEFAULT_PROXY_HEADER_TIMEOUT",
    "MAX_PROXY_HEADER_TIMEOUT",
    "DEFAULT_PROXY_MAX_HEADER_LENGTH",
    "MIN_PROXY_MAX_HEADER_LENGTH",
    "MAX_PROXY_MAX_HEADER_LENGTH",
    "DEFAULT_PROXY_OPTIONAL_WAIT",
    "MAX_PROXY_OPTIONAL_WAIT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_IDLE_TIMEOUT",
    "DEFAULT_TLS_HANDSHAKE_TIMEOUT",
    "MAX_TLS_HANDSHAKE_TIMEOUT",
    "MAX_RATE_LIMIT_COUNT",
    "MAX_RATE_LIMIT_PERIOD",
    "MIN_IPV6_PREFIX",
    "MAX_IPV6_PREFIX",
    "DEFAULT_AUTO_BAN_FAILURES",
    "MAX_AUTO_BAN_FAILURES",
    "DEFAULT_AUTO_BAN_WINDOW",
    "MAX_AUTO_BAN_WINDOW",
    "DEFAULT_AUTO_BAN_DURATION",
    "MAX_AUTO_BAN_DURATION",
    "DEFAULT_IPV6_PREFIX",
    "NAT64_PREFIX_LENGTH",
    "MAX_NAT64_PREFIXES",
    "DEFAULT_STORE_URL",
    "DEFAULT_STORE_KEY_PREFIX",
    "DEFAULT_STORE_TIMEOUT",
    "MAX_STORE_TIMEOUT",
    "DEFAULT_STORE_RESYNC_PERIOD",
    "MAX_STORE_RESYNC_PERIOD",
]

# The spec asks for at least 3 s so that a header delayed by one TCP retransmission still
# arrives; Dovecot and Exim use 3, Postfix 5, go-proxyproto 10. 5 leaves margin for a slow proxy.
DEFAULT_PROXY_HEADER_TIMEOUT = 5.0
# Beyond 5 minutes is a unit mistake (milliseconds written as seconds), and every silent peer
# would hold a connection slot that long.
MAX_PROXY_HEADER_TIMEOUT = 300.0
# go-proxyproto's cap on a whole v2 header. HAProxy's usual TLVs (SSL details, ALPN, authority,
# unique id) take a few hundred bytes, so 4 KiB is ample, yet no peer makes us buffer 64 KiB.
# Raise it if the proxy forwards client certificates.
DEFAULT_PROXY_MAX_HEADER_LENGTH = 4096
# 16-byte v2 fixed part + 216-byte AF_UNIX address block: the longest header without any TLV.
MIN_PROXY_MAX_HEADER_LENGTH = 16 + 216
# 16 + 65,535: the most a v2 header's 16-bit length field can announce.
MAX_PROXY_MAX_HEADER_LENGTH = 16 + 0xFFFF
# Long enough for a proxy's header, already in flight, to land after accept(); short enough that
# a direct client from a trusted address (a health check, a local script) hardly notices.
DEFAULT_PROXY_OPTIONAL_WAIT = 0.25
# Every direct connection from a trusted address pays this wait before its greeting; more than
# 10 s is a unit mistake (250 meaning milliseconds).
MAX_PROXY_OPTIONAL_WAIT = 10.0

# Every open connection costs a descriptor and a task; 512 per listener keeps a few listeners
# inside a default 4,096-descriptor limit while serving far more than a typical MX sees at once.
DEFAULT_MAX_CONNECTIONS = 512
# Counted on the recovered client (an IPv6 /64): one host rarely needs more than a handful of
# parallel sessions, and a flood from one address must not take every slot.
DEFAULT_MAX_CONNECTIONS_PER_IP = 16
# RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
DEFAULT_IDLE_TIMEOUT = 300.0
# An hour without a byte is a dead peer, or a unit mistake.
MAX_IDLE_TIMEOUT = 3600.0
# A handshake is a few round trips; 10 s covers slow links and bounds a client that stalls in it.
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
# Beyond a minute a handshake is an attack or a unit mistake.
MAX_TLS_HANDSHAKE_TIMEOUT = 60.0

# More than a million per period is no limit at all; a larger number is a typo.
MAX_RATE_LIMIT_COUNT = 1_000_000
# Each limited client's state lives up to one period; a day covers daily quotas, and longer
# periods would hold per-client state (and memory) for longer than any mail policy needs.
MAX_RATE_LIMIT_PERIOD = 86400.0
# Shorter than a /32 (a typical whole-ISP allocation) would lump unrelated customers together.
MIN_IPV6_PREFIX = 32
# /128 is a single address: Stalwart's choice, which lets one host sidestep limits.
MAX_IPV6_PREFIX = 128
# Ten failures are more than typos and a forgotten password on a phone; far fewer than a
# guessing run, which tries hundreds.
DEFAULT_AUTO_BAN_FAILURES = 10
# Each tracked client keeps up to this many failure times; a threshold beyond it is no ban.
MAX_AUTO_BAN_FAILURES = 1000
# Ten minutes: slow enough guessing (under 10 per 10 min) is too slow to matter, and a
# failure record is forgotten soon enough that a user's typos never add up over a day.
DEFAULT_AUTO_BAN_WINDOW = 600.0
# A window over a day keeps failure records (memory) for too long to be worth it.
MAX_AUTO_BAN_WINDOW = 86400.0
# An hour stops a guessing run cold, and a user who locked themselves out is back the same day.
DEFAULT_AUTO_BAN_DURATION = 3600.0
# Thirty days: anything longer belongs in a firewall rule, not in memory.
MAX_AUTO_BAN_DURATION = 30 * 86400.0
# A site runs one or two NAT64 translators; each prefix costs an integer compare on every IPv6
# connection that matches no built-in prefix, so a list of hundreds is a mistake.
MAX_NAT64_PREFIXES = 64

# [Store]: where limits and bans live when several processes or hosts share them.
# Redis's own default address: a local server answers without any further setting.
DEFAULT_STORE_URL = "redis://127.0.0.1:6379/0"
# One prefix for every key, so mailedge can share a Redis with other programs and SCAN only its own.
DEFAULT_STORE_KEY_PREFIX = "mailedge:"
# 50 ms per store call: a local Redis answers in well under 1 ms, and a connection that waits
# longer for a policy decision is delayed in a way a client notices (Envoy's global rate limit
# uses 20 ms). Beyond it the failure policy decides instead.
DEFAULT_STORE_TIMEOUT = 0.05
# Over 5 s per call is a unit mistake (milliseconds written as seconds): every connection could
# wait that long on a dead store.
MAX_STORE_TIMEOUT = 5.0
# Every 30 s each process re-reads the whole mirrored ban list, so a lost pub/sub message leaves
# a stale or missing ban for at most this long; a few hundred bans cost one SCAN and one read each.
DEFAULT_STORE_RESYNC_PERIOD = 30.0
# An hour: a longer gap lets a missed lift keep a client locked out for longer than a ban is worth.
MAX_STORE_RESYNC_PERIOD = 3600.0
