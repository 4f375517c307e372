"""Who may call what: API keys with roles, rate and concurrency limits, TLS (every service).

Callers present an API key as ``authorization: Bearer <key>`` (gRPC metadata, or the HTTP header
of the feedback service's JSON API). Servers are configured with the keys' sha256 digests only
(``api_keys`` / ``api_keys_file``, entries made by ``plaudit keys new``); the digest of a presented
key is compared with every configured digest by :func:`hmac.compare_digest`, whatever matches. A
key carries roles, and each call needs the one role that the serving service's own table names
for it (``call_roles``, declared beside each service); a call its table does not name is refused
to every key. Health and reflection stay open. A missing or unknown key is UNAUTHENTICATED, a
known key without the role PERMISSION_DENIED.

Authentication is off only when asked for (``auth_disabled``); a server with neither keys nor
that setting refuses to start, and one running without authentication logs a WARNING.

Per key, a token bucket limits the call rate (``rate_limit_rps``, ``rate_limit_burst``); per
process, ``max_in_flight`` bounds the calls being served at once. Both answer RESOURCE_EXHAUSTED.
gRPC serves TLS when given a certificate and key, and requires client certificates signed by
``tls_client_ca_file`` when that is set (mutual TLS).
"""
