"""Replicas that share the platform secrets only with attested peers (``cube-enclave serve --join``).

``protocol``: the messages and the encryption of the secrets to the joiner; ``server``: the routes a running
replica serves; ``client``: what a new replica runs to obtain the secrets; ``policy``: the join policy from the
configuration (default: a peer exactly like this replica, ``attestation.peer.same_as_me_policy``).
"""
