"""The download engine: `http` (connections, proxies, TLS, retries, rate limits), `ranged` (pieces, resume,
`fetch` and `fetch_small`), `concurrency` (range streams in flight, the piece-buffer budget). The names
other modules use are re-exported here."""

from hpcstage.transfer.concurrency import MAX_CONNECTIONS
from hpcstage.transfer.http import (
    DROPPED,
    Http,
    Proxies,
    Response,
    RetryPolicy,
    open_connection,
    parse_retry_after,
    ratelimit_wait,
)
from hpcstage.transfer.ranged import CHUNK, PIECE, SMALL, fetch, fetch_small

__all__ = [
    "CHUNK",
    "DROPPED",
    "MAX_CONNECTIONS",
    "PIECE",
    "SMALL",
    "Http",
    "Proxies",
    "Response",
    "RetryPolicy",
    "fetch",
    "fetch_small",
    "open_connection",
    "parse_retry_after",
    "ratelimit_wait",
]
