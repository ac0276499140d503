"""The registry of issued fingerprinted copies (SQLite by default, any SQLAlchemy database URL).

See :mod:`nnmark.registry.store` for the crash-safe issuing protocol.
"""

from nnmark.registry.store import (
    SCHEMA_VERSION,
    Customer,
    IssuedCopy,
    ProductInfo,
    RecoveryReport,
    Registry,
    RegistryError,
    RegistryNotFoundError,
    RegistryProductError,
    RegistrySchemaError,
    Reservation,
    database_url,
)

__all__ = [
    "SCHEMA_VERSION",
    "Customer",
    "IssuedCopy",
    "ProductInfo",
    "RecoveryReport",
    "Registry",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistryProductError",
    "RegistrySchemaError",
    "Reservation",
    "database_url",
]
