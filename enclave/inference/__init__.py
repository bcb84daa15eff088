"""Inference through the gateway: request bodies, backend admission and connections, stream relaying, usage.

The routers (``enclave.api.inference`` for the OpenAI routes, ``enclave.api.ollama`` for Ollama's native ones)
decide access and call into this package; nothing here decides who may do what.
"""
