"""The adapter registry: immutable, versioned LoRA adapters, published by
reference or by upload, kept in SQL + a durable blob store.

Entry points: ``app.build_app`` (gRPC service), ``domain.AdapterRegistry``
(the domain), ``publish`` (how version numbers stay gap-free).
"""
