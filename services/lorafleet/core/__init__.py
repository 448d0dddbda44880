"""Service runtime shared by every lorafleet service.

Config, logging, errors, gRPC server/client plumbing, idempotency and request
validation. Import the submodules directly (``from lorafleet.core.errors import
NotFound``); this package imports nothing eagerly so that importing one piece
never drags in the others.
"""
