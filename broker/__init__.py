"""Rigshift broker: the marketplace core, its scheduler and gRPC services."""
