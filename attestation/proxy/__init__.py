"""``cube-attest proxy``: a loopback HTTP/1.1 proxy that relays every request to one enclave over attested TLS.

For clients that cannot embed the Python attested client (Continue, OpenCode, any Node or shell tool): they talk
plain HTTP to 127.0.0.1, and every upstream connection is verified by
:class:`attestation.atls.client.AsyncAttestedClient` before a request byte (or the PAT) leaves the machine.
``server`` is the HTTP/1.1 side (asyncio streams + h11), ``forward`` the attested relay, ``envelope`` the error
bodies, ``snippets`` the client configuration printed at start, ``command`` the CLI.
"""
